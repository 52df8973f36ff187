"""Tests of train/config.py: per-model defaults from the references, recipes, precedence, YAML round trip."""
from __future__ import annotations

import pytest

from train.config import RECIPES, ConfigError, build_config, config_from_run_yaml, save_yaml


def test_mee_defaults():
    c = build_config("mee")
    assert (c.optimizer, c.lr, c.lr_decay, c.schedule, c.weight_decay) == ("adam", 1e-4, 0.95, "exponential", 0.0)
    assert (c.batch_size, c.epochs, c.image_rate, c.grad_clip) == (128, 50, 0.5, 0.0)


@pytest.mark.parametrize("model", ["tmass", "xpool"])
def test_tmass_xpool_defaults(model):
    c = build_config(model)
    assert (c.optimizer, c.weight_decay, c.schedule, c.warmup, c.grad_clip) == ("adamw", 0.2, "cosine", 0.1, 1.0)
    assert (c.batch_size, c.epochs, c.lr, c.image_rate) == (32, 5, 1e-5, 0.0)


def test_recipes():
    c = build_config("mee", {"recipe": "msrvtt"})
    assert (c.lr, c.batch_size, c.epochs, c.image_rate) == (4e-4, 64, 100, 0.5)
    c = build_config("mee", {"recipe": "lsmdc"})
    assert (c.lr, c.batch_size) == (1e-4, 512)
    c = build_config("tmass", {"recipe": "lsmdc", "lr": 2e-5, "model_config": {"trials": 5}})
    assert c.lr == 2e-5  # explicit keys win over the recipe
    assert c.model_config == {"support_weight": 0.0, "prior": "normal", "prior_std": 3e-3, "trials": 5}  # merged
    assert build_config("tmass", {"recipe": "msrvtt"}).lr == 3e-5
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_config("xpool", {"recipe": "didemo"})
    assert set(RECIPES) == {"mee", "tmass", "xpool"}


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="'batch_size'"):
        build_config("mee", {"batch_size": 1})
    with pytest.raises(ConfigError, match="'optimizer'"):
        build_config("mee", {"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        build_config("mee", {"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="trains 'mee'"):
        build_config("mee", {"model": "tmass"})


def test_yaml_round_trip(tmp_path):
    c = build_config("tmass", {"recipe": "lsmdc", "epochs": 2})
    save_yaml(c, tmp_path / "config.yaml", {"store": "s.zarr"})
    back, extra = config_from_run_yaml(tmp_path / "config.yaml")
    assert back == c and extra == {"store": "s.zarr"}


def test_reference_recipes_set_the_reference_sampling_and_batching():
    """T-MASS / X-Pool references train on every (video, caption) pair; the MEE reference drops the last batch."""
    for model in ("tmass", "xpool"):
        assert build_config(model).caption_sampling == "per_video"  # cheap default
        for recipe in RECIPES[model]:
            assert build_config(model, {"recipe": recipe}).caption_sampling == "all_pairs", (model, recipe)
    assert build_config("mee").drop_last is False
    assert all(build_config("mee", {"recipe": r}).drop_last for r in RECIPES["mee"])
    assert build_config("mee", {"recipe": "msrvtt", "drop_last": False}).drop_last is False
    with pytest.raises(ConfigError, match="'caption_sampling'"):
        build_config("tmass", {"caption_sampling": "every"})


def test_resume_changes_lists_what_alters_training():
    from train.config import resume_changes

    a = build_config("tmass", {"recipe": "msrvtt"})
    assert resume_changes(a, build_config("tmass", {"recipe": "msrvtt", "device": "cpu", "eval_chunk": 7})) == []
    b = build_config("tmass", {"recipe": "msrvtt", "lr": 1e-4, "batch_size": 16, "model_config": {"trials": 3}})
    assert resume_changes(a, b) == ["model_config.trials: 20 -> 3", "batch_size: 32 -> 16", "lr: 3e-05 -> 0.0001"]
    # an explicit default is no change
    assert resume_changes(a, build_config("tmass", {"recipe": "msrvtt", "model_config": {"trials": 20}})) == []


def test_num_workers_is_gone():
    """Features are always read in-process; a config still setting num_workers is told the key is unknown."""
    with pytest.raises(ConfigError, match="unknown key 'num_workers'"):
        build_config("mee", {"num_workers": 0})
