"""End-to-end tests of `tvr-train` (train.cli.main) in-process on a tiny synthetic store."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from store import synth
from train.cli import main

METRIC_KEYS = {"R@1", "R@5", "R@10", "R@50", "MdR", "MnR"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cli") / "tiny.zarr")
    synth.generate(
        url, items=40, captions_per_item=2, missing={"dlib_face": 0.5, "vggish": 0.2}, images=10, seed=0,
        small=True, choices=3,
    )
    return url


def _args(model, store_url, run, *extra):
    return [model, "--store", store_url, "--out", str(run), "--epochs", "2", "--batch-size", "8", "--device", "cpu",
            "--lr", "1e-3", *extra]


def _same_weights(a, b) -> bool:
    sa = torch.load(a, weights_only=True)["model"]
    sb = torch.load(b, weights_only=True)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("model", ["mee", "tmass", "xpool"])
def test_train_resume_and_eval(model, store_url, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(_args(model, store_url, straight)) == 0
    captured = capsys.readouterr()
    assert "t2v" in captured.out and "v2t" in captured.out
    assert "epoch 1/2" in captured.err and "batch" in captured.err  # per-epoch progress bar (tqdm, stderr)

    # run contents
    cfg = yaml.safe_load((straight / "config.yaml").read_text())
    assert cfg["model"] == model and cfg["epochs"] == 2 and cfg["store"] == store_url
    for ck in ("last.pt", "best.pt"):
        state = torch.load(straight / ck, weights_only=True)
        assert isinstance(state["model"], dict) and state["epoch"] in (1, 2)
    assert "optimizer" in torch.load(straight / "last.pt", weights_only=True)
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(np.isfinite(x["train_loss"]) and METRIC_KEYS <= set(x["val"]["t2v"]) for x in lines)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics["t2v"]) and METRIC_KEYS <= set(metrics["v2t"])
    assert metrics["n_videos"] == 4 and metrics["n_queries"] == 8  # test split: 4 videos x 2 captions
    mc = metrics["multiple_choice"]
    assert mc["n_questions"] == 4 and 0.0 <= mc["accuracy"] <= 1.0
    for png in ("loss.png", "recall.png"):
        data = (straight / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000

    # interrupted after epoch 1 + --resume == uninterrupted
    resumed = tmp_path / "resumed"
    assert main(_args(model, store_url, resumed, "--stop-after", "1")) == 0
    assert not (resumed / "metrics.json").exists()
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(_args(model, store_url, resumed, "--resume")) == 0
    assert _same_weights(straight / "last.pt", resumed / "last.pt")
    assert _same_weights(straight / "best.pt", resumed / "best.pt")
    assert json.loads((resumed / "metrics.json").read_text()) == metrics
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()

    # eval reproduces the final test metrics from best.pt
    capsys.readouterr()
    assert main(["eval", str(straight)]) == 0
    table = capsys.readouterr().out
    assert "R@1" in table and "t2v" in table and "multiple choice" in table
    evaluated = json.loads((straight / "metrics_test.json").read_text())
    assert evaluated["t2v"] == metrics["t2v"] and evaluated["v2t"] == metrics["v2t"]
    assert main(["eval", str(straight), "--split", "val", "--checkpoint", "last"]) == 0
    assert json.loads((straight / "metrics_val.json").read_text())["t2v"] == lines[-1]["val"]["t2v"]


def test_seeded_runs_reproducible_and_seed_matters(store_url, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    base = ["mee", "--store", store_url, "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert main([*base, "--out", str(a), "--seed", "3"]) == 0
    assert main([*base, "--out", str(b), "--seed", "3"]) == 0
    assert main([*base, "--out", str(c), "--seed", "4"]) == 0
    assert _same_weights(a / "last.pt", b / "last.pt")
    assert not _same_weights(a / "last.pt", c / "last.pt")


def test_config_file_precedence_and_bad_key(store_url, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 1\nbatch_size: 4\nlr: 0.0005\nimage_rate: 0.0\n")
    run = tmp_path / "cfgrun"
    assert main(["mee", "--store", store_url, "--out", str(run), "--config", str(good), "--batch-size", "6",
                 "--device", "cpu"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["image_rate"]) == (1, 6, 0.0005, 0.0)
    assert cfg["optimizer"] == "adam" and cfg["lr_decay"] == 0.95  # MEE defaults kept

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nlearning_rate: 0.1\n")
    capsys.readouterr()
    assert main(["mee", "--store", store_url, "--out", str(tmp_path / "x"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and str(bad) in err
    badtype = tmp_path / "badtype.yaml"
    badtype.write_text("epochs: many\n")
    assert main(["mee", "--store", store_url, "--out", str(tmp_path / "y"), "--config", str(badtype)]) == 2
    assert "'epochs'" in capsys.readouterr().err


def test_errors(store_url, tmp_path, capsys):
    from store.schema import FeatureSpec, ItemRecord
    from store.zarr_store import FeatureStore

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["mee", "--store", str(tmp_path / "nostore.zarr"), "--out", str(tmp_path / "r0")]) == 2
    assert "nostore.zarr" in capsys.readouterr().err
    assert main(["tmass", "--store", store_url, "--out", str(tmp_path / "r1"), "--resume"]) == 2
    assert "last.pt" in capsys.readouterr().err

    url = str(tmp_path / "partial.zarr")
    st = FeatureStore.create(url, [ItemRecord("a", "a.mp4", split="train"), ItemRecord("b", "b.mp4", split="val")])
    st.ensure_feature(FeatureSpec("resnet152", 8, 4), {"weights": {"random": True, "seed": 0}})
    assert main(["mee", "--store", url, "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "i3d_flow" in err and "glove" in err and "tvr-extract SOURCE --store" in err

    run = tmp_path / "r3"
    args = ["xpool", "--store", store_url, "--out", str(run), "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert main(args) == 0
    assert main(args) == 2  # refuses to overwrite a run without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["mee", "--store", store_url, "--out", str(run), "--resume"]) == 2  # model mismatch
    assert "xpool" in capsys.readouterr().err


def test_recipe_flag_is_resolved_into_the_saved_config(store_url, tmp_path):
    run = tmp_path / "recipe"
    assert main(["tmass", "--store", store_url, "--out", str(run), "--recipe", "lsmdc", "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["recipe"] == "lsmdc" and cfg["lr"] == 1e-5 and cfg["batch_size"] == 8
    assert cfg["model_config"] == {"support_weight": 0.0, "prior": "normal", "prior_std": 3e-3}
    assert main(["eval", str(run), "--split", "val"]) == 0
