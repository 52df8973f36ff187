"""Registry-wide tests of train/models: every registered model builds, encodes, scores, and trains one step."""
from __future__ import annotations

import pytest
import torch

from store.schema import FeatureSpec
from train.models import UnknownModelError, create_model, list_models, register_model
from train.models._api import ModelConfigError, feature_dims_from, resolve_config
from train.models.mee import MEEConfig

DIMS = {"resnet152": 6, "i3d_flow": 5, "vggish": 4, "dlib_face": 3, "glove": 7, "clip": 8, "clip_text": 8}
TINY = {"mee": {"text_clusters": 3, "audio_clusters": 2}, "tmass": {"num_frames": 4, "trials": 3},
        "xpool": {"num_frames": 4}}


def _batch(model, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = {}
    for f in model.video_features:
        steps = 4
        x = torch.randn(n, steps, DIMS[f], generator=g)
        video[f], video[f"{f}_mask"] = x, torch.ones(n, steps, dtype=torch.bool)
        video[f"{f}_avail"] = torch.tensor([True, False, True, True][:n]) if f == "dlib_face" else torch.ones(n, dtype=torch.bool)
    if "glove" in model.text_features:
        text = {"words": torch.randn(n, 5, DIMS["glove"], generator=g), "words_mask": torch.ones(n, 5, dtype=torch.bool)}
    else:
        text = {"clip_text": torch.randn(n, DIMS["clip_text"], generator=g)}
    return text, video


def test_all_models_registered():
    assert list_models() == ["mee", "tmass", "xpool"]


@pytest.mark.parametrize("name", list_models())
def test_build_forward_loss_backward(name):
    torch.manual_seed(0)
    model = create_model(name, feature_dims=DIMS, **TINY.get(name, {}))
    assert set(model.video_features) | set(model.text_features) <= set(DIMS)
    text, video = _batch(model)
    te, ve = model.encode_text(text), model.encode_video(video)
    assert all(v.shape[0] == 4 for v in (*te.values(), *ve.values()))  # item axis first (batch concatenation)
    loss, parts = model.loss(te, ve)
    assert loss.ndim == 0 and torch.isfinite(loss) and all(isinstance(v, float) for v in parts.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.clamp_logit_scale()
    groups = model.param_groups(1e-3)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    model.eval()
    with torch.no_grad():
        te, ve = model.encode_text(text), model.encode_video(video)
        sim = model.similarity(te, ve, chunk=3)
        assert sim.shape == (4, 4) and torch.isfinite(sim).all()
        assert torch.allclose(model.similarity(te, ve, chunk=1), sim, atol=1e-6)
        assert torch.allclose(model.similarity(te, ve), sim, atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_specs_give_dims_and_overrides_apply(name):
    specs = {f: FeatureSpec(f, d, 4) for f, d in DIMS.items()}
    from_specs = create_model(name, specs=specs, **TINY.get(name, {}))
    from_dims = create_model(name, feature_dims=DIMS, **TINY.get(name, {}))
    shapes = {k: v.shape for k, v in from_dims.state_dict().items()}
    assert {k: v.shape for k, v in from_specs.state_dict().items()} == shapes
    with pytest.raises(ModelConfigError, match="unknown key"):
        create_model(name, specs=specs, no_such_option=1)


def test_frames_count_from_spec():
    specs = {"clip": FeatureSpec("clip", 8, 6), "clip_text": FeatureSpec("clip_text", 8, 1)}
    assert create_model("xpool", specs=specs).num_frames == 6
    assert create_model("tmass", specs=specs).radius.linear.in_features == 6


def test_registry_errors():
    with pytest.raises(UnknownModelError, match="registered: mee, tmass, xpool"):
        create_model("clip4clip")
    with pytest.raises(ValueError, match="already registered"):
        register_model("mee")(lambda **kw: None)


def test_config_helpers():
    cfg = resolve_config(MEEConfig, {"margin": 0.1}, {"text_clusters": 8})
    assert (cfg.margin, cfg.text_clusters) == (0.1, 8)
    assert resolve_config(MEEConfig, cfg, {}).margin == 0.1
    with pytest.raises(ModelConfigError, match="mapping"):
        resolve_config(MEEConfig, 3, {})
    assert feature_dims_from({"a": 3}, {"a": FeatureSpec("a", 5, 1), "b": FeatureSpec("b", 2, 1)}) == {"a": 3, "b": 2}
