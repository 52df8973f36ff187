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


# ---- a trainer that refuses bad runs (issue 11 §5) ------------------------------------------------------------
def _poison(url, feature, rows, value):
    """Write `value` into every step of `rows` of a feature (status stays OK), as a buggy extractor would."""
    import zarr

    arr = zarr.open_group(url, mode="r+")[feature]["values"]
    for r in rows:
        block = np.asarray(arr[r : r + 1])
        block[...] = value
        arr[r : r + 1] = block


@pytest.fixture()
def fresh_store(tmp_path):
    """A tiny synthetic store this test may modify."""
    url = str(tmp_path / "fresh.zarr")
    synth.generate(url, items=40, captions_per_item=2, seed=0, small=True)
    return url


@pytest.mark.parametrize("cache", ["cached", "per_batch"])
def test_nonfinite_feature_values_stop_the_run(fresh_store, tmp_path, capsys, cache):
    from store.zarr_store import FeatureStore

    st = FeatureStore.open(fresh_store)
    split = np.asarray(st.items().split).astype(str)
    ids = np.asarray(st.items().id).astype(str)
    bad = np.flatnonzero(split == "train")[[2, 5]]
    # inf / -inf: the store's reader reports NaN in an OK row itself, as lost data
    _poison(fresh_store, "clip", bad[:1], float("-inf"))
    _poison(fresh_store, "clip", bad[1:], float("inf"))
    run = tmp_path / "nan"
    extra = []
    if cache == "per_batch":
        (tmp_path / "lazy.yaml").write_text("cache_bytes: 0\n")
        extra = ["--config", str(tmp_path / "lazy.yaml")]
    capsys.readouterr()
    assert main(_args("tmass", fresh_store, run, *extra)) == 2
    err = capsys.readouterr().err
    assert "'clip'" in err and "NaN/inf" in err and "Traceback" not in err
    assert ids[bad[0]] in err and (cache == "per_batch" or ids[bad[1]] in err)
    assert not (run / "metrics.json").exists() and not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_nonfinite_caption_feature_names_the_captions(fresh_store, tmp_path, capsys):
    from store.zarr_store import FeatureStore

    cap_ids = np.asarray(FeatureStore.open(fresh_store).captions().id).astype(str)
    _poison(fresh_store, "glove", [3], float("inf"))
    assert main(_args("mee", fresh_store, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "'glove'" in err and cap_ids[3] in err and "caption row" in err


def test_nonfinite_parameter_stops_the_run(store_url, tmp_path, capsys, monkeypatch):
    """A step that leaves a NaN weight (finite loss) ends the run with an error and writes no checkpoint for it."""
    import train.engine as engine

    real = engine.make_optimizer

    def poisoned(cfg, model):
        opt = real(cfg, model)
        step = opt.step

        def bad_step(*a, **k):
            out = step(*a, **k)
            with torch.no_grad():
                model.moe.bias[0] = float("nan")  # scores fall back to 0: the loss stays finite, the weights do not
            return out

        opt.step = bad_step
        return opt

    monkeypatch.setattr(engine, "make_optimizer", poisoned)
    run = tmp_path / "p"
    assert main(_args("mee", store_url, run)) == 2
    err = capsys.readouterr().err
    assert "epoch 1: " in err and "parameter tensor(s) became NaN/inf (text_vlad.assign" in err
    assert "no checkpoint was written" in err
    assert not (run / "last.pt").exists() and not (run / "metrics.json").exists()


def test_nonfinite_loss_names_the_batch(store_url, tmp_path, capsys, monkeypatch):
    from store.zarr_store import FeatureStore
    from train.data import StoreData
    from train.models.xpool import XPoolModel

    real = XPoolModel.loss
    calls = []

    def loss(self, t, v):
        calls.append(1)
        out, parts = real(self, t, v)
        return (out * float("nan"), parts) if len(calls) == 2 else (out, parts)

    monkeypatch.setattr(XPoolModel, "loss", loss)
    assert main(_args("xpool", store_url, tmp_path / "l")) == 2
    err = capsys.readouterr().err
    # batch 2 of epoch 1, recomputed independently from the epoch's sampling
    data = StoreData(FeatureStore.open(store_url), "xpool")
    rows, caps = data.epoch_pairs(0, 24, 0.0)
    items = np.asarray(FeatureStore.open(store_url).items().id).astype(str)[rows[8:16]]
    assert "epoch 1 batch 2: loss is nan" in err and all(repr(str(i)) in err for i in items[:5])
    assert "training diverged" in err


def test_resume_refuses_another_store_and_records_the_store_id(store_url, tmp_path, capsys):
    from store.zarr_store import FeatureStore

    run = tmp_path / "r"
    assert main(_args("xpool", store_url, run, "--stop-after", "1")) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["store_id"] == FeatureStore.open(store_url).store_id != ""
    other = str(tmp_path / "other.zarr")
    synth.generate(other, items=40, captions_per_item=2, missing={"dlib_face": 0.5, "vggish": 0.2}, images=10,
                   seed=0, small=True, choices=3)  # same content, another store
    before = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(_args("xpool", other, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert "another store" in err and saved["store_id"] in err and "other.zarr" in err
    assert (run / "config.yaml").read_bytes() == before  # nothing rewritten
    capsys.readouterr()
    assert main(["eval", str(run), "--store", other, "--split", "val"]) == 0  # evaluating elsewhere is allowed ...
    assert "evaluating on another store" in capsys.readouterr().err  # ... and said
    assert main(_args("xpool", store_url, run, "--resume")) == 0  # the same store resumes


@pytest.mark.parametrize("change, expect", [
    (["--lr", "0.01"], "lr: 0.001 -> 0.01"),
    (["--batch-size", "4"], "batch_size: 8 -> 4"),
    (["--config", "MC"], "model_config.dropout: 0.3 -> 0.1"),
])
def test_resume_refuses_changed_settings(store_url, tmp_path, capsys, change, expect):
    run = tmp_path / "r"
    assert main(_args("xpool", store_url, run, "--stop-after", "1")) == 0
    (tmp_path / "mc.yaml").write_text("model_config:\n  dropout: 0.1\n")
    change = [str(tmp_path / "mc.yaml") if c == "MC" else c for c in change]
    before = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    base = ["xpool", "--store", store_url, "--out", str(run), "--epochs", "2", "--batch-size", "8", "--device", "cpu",
            "--lr", "1e-3"]
    argv = base + ["--resume"] + change
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert (run / "config.yaml").read_bytes() == before


def test_checkpoint_that_does_not_fit_the_model(store_url, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(_args("mee", store_url, run, "--epochs", "1")) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model_config"] = {"text_clusters": 8}  # edited by hand: the weights no longer fit
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "best.pt does not fit" in err and "size mismatch" in err


@pytest.mark.parametrize("damage", ["cut", "foreign_object", "plain_state_dict", "garbage"])
def test_cut_off_or_foreign_checkpoint(store_url, tmp_path, capsys, damage):
    import collections

    run = tmp_path / "r"
    assert main(_args("xpool", store_url, run, "--stop-after", "1")) == 0
    last = run / "last.pt"
    if damage == "cut":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "foreign_object":
        torch.save({"model": collections.Counter(a=1), "cfg": argparse_namespace()}, last)
    elif damage == "plain_state_dict":
        torch.save(torch.load(last, weights_only=True)["model"], last)
    else:
        last.write_bytes(b"not a checkpoint at all")
    capsys.readouterr()
    assert main(_args("xpool", store_url, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "Traceback" not in err
    assert "weights_only" not in err and "trust" not in err  # never suggests unsafe loading
    assert {"cut": "cut off", "garbage": "cut off", "foreign_object": "not a tvr-train checkpoint",
            "plain_state_dict": "not a tvr-train checkpoint"}[damage] in err


def argparse_namespace():
    """An object torch's weights_only loader refuses."""
    import argparse

    return argparse.Namespace(lr=1.0)


def test_out_is_a_file(store_url, tmp_path, capsys):
    f = tmp_path / "run.txt"
    f.write_text("mine")
    assert main(_args("mee", store_url, f)) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(_args("mee", store_url, f / "sub")) == 2
    assert "run.txt" in capsys.readouterr().err
    assert f.read_text() == "mine"


def test_empty_test_split_fails_before_training(tmp_path, capsys):
    url = str(tmp_path / "notest.zarr")
    synth.generate(url, items=20, captions_per_item=1, splits=(0.8, 0.2, 0.0), small=True)
    run = tmp_path / "r"
    assert main(_args("mee", url, run)) == 2
    assert "split 'test' has no videos" in capsys.readouterr().err
    assert not (run / "last.pt").exists() and not (run / "metrics.jsonl").exists()


def test_text_feature_word2vec_is_served(tmp_path, capsys):
    """MEE with model_config.text_feature: word2vec trains on a store that has word2vec and no glove."""
    import shutil

    from store.schema import FeatureRows, FeatureSpec, Status
    from store.zarr_store import FeatureStore

    url = str(tmp_path / "w2v.zarr")
    synth.generate(url, items=30, captions_per_item=2, small=True, seed=4)
    st = FeatureStore.open(url, "r+")
    glove = st.read("glove")
    spec = FeatureSpec("word2vec", 24, 30, dtype="float32", modality="words", axis="caption",
                       chunk_rows=st.spec("glove").chunk_rows)
    st.ensure_feature(spec, {"weights": {"random": True, "seed": 0}})
    proj = np.random.default_rng(0).standard_normal((50, 24)).astype(np.float32)
    rows = []
    for i in range(st.n_captions):
        n = int(glove.mask[i].sum())
        rows.append(FeatureRows(Status.OK, glove.values[i, :n] @ proj, np.arange(n, dtype=np.float32)))
    st.write_block("word2vec", 0, rows)
    shutil.rmtree(tmp_path / "w2v.zarr" / "glove")
    (tmp_path / "w.yaml").write_text("model_config:\n  text_feature: word2vec\n")
    run = tmp_path / "r"
    assert main(_args("mee", url, run, "--epochs", "1", "--config", str(tmp_path / "w.yaml"))) == 0
    state = torch.load(run / "best.pt", weights_only=True)["model"]
    assert state["text_vlad.assign"].shape[0] == 24  # NetVLAD over 24-d word2vec vectors, not 50-d GloVe


# ---- evaluation as the reference does it (issue 11 §6) --------------------------------------------------------
def test_eval_reports_the_spread_over_noise_seeds(store_url, tmp_path, capsys):
    from tests._train_eval import direct_metrics

    run = tmp_path / "t"
    assert main(_args("tmass", store_url, run, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val", "--noise-seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "over 3 noise seeds" in out and "+-" in out
    got = json.loads((run / "metrics_val.json").read_text())
    spread = got["noise_seeds"]
    assert spread["n"] == 3 and spread["seeds"] == [0, 1, 2]
    runs = direct_metrics(run, store_url, "val", range(3))  # independent: each seed scored directly
    for d in ("t2v", "v2t"):
        vals = np.array([float(r[d]["R@1"]) for r in runs])
        assert spread["mean"][d]["R@1"] == pytest.approx(vals.mean()) and spread["std"][d]["R@1"] == pytest.approx(vals.std())
        assert got[d]["R@1"] == pytest.approx(vals[0])  # the main numbers are eval_seed's
    capsys.readouterr()
    assert main(["eval", str(run), "--noise-seeds", "0"]) == 2
    xp = tmp_path / "x"
    assert main(_args("xpool", store_url, xp, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["eval", str(xp), "--noise-seeds", "2"]) == 2
    assert "no evaluation noise" in capsys.readouterr().err


def test_recipe_trains_on_every_pair(store_url, tmp_path):
    """--recipe msrvtt (T-MASS): an epoch is every (video, caption) pair, twice the steps of one caption per video."""
    from store.zarr_store import FeatureStore
    from train.data import StoreData

    run = tmp_path / "rec"
    assert main(["xpool", "--store", store_url, "--out", str(run), "--recipe", "msrvtt", "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["caption_sampling"] == "all_pairs"
    data = StoreData(FeatureStore.open(store_url), "xpool")
    n_videos = len(data.train_items()[0])
    steps = torch.load(run / "last.pt", weights_only=True)["step"]
    assert steps == data.n_train_batches(8, 0.0, "all_pairs") == -(-2 * n_videos // 8)  # 2 captions per video
    assert data.n_train_batches(8, 0.0) == -(-n_videos // 8)


@pytest.mark.slow
def test_console_eval_exits_fast_with_all_output(store_url, tmp_path):
    """`python -m train eval` (console(): os._exit after eval) prints the whole table through a pipe, writes the
    metrics and returns main's exit code; an eval error still prints its message and exits 2."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    assert main(["xpool", "--store", store_url, "--out", str(run), "--epochs", "1", "--batch-size", "8",
                 "--device", "cpu"]) == 0
    res = subprocess.run([sys.executable, "-m", "train", "eval", str(run)], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"{run} (best checkpoint)") and lines[-1] == f"wrote {run / 'metrics_test.json'}"
    assert json.loads((run / "metrics_test.json").read_text())["t2v"].keys() >= METRIC_KEYS
    bad = subprocess.run([sys.executable, "-m", "train", "eval", str(tmp_path / "nothing")], cwd=root,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a tvr-train run" in bad.stderr
