"""Slow: each model learns the planted structure of a synthetic store (test R@1 well above chance, not perfect)."""
from __future__ import annotations

import json

import pytest

from store import synth
from train.cli import main

N_ITEMS = 300  # 10% test -> 30 test videos, chance R@1 = 1/30


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("learn") / "learn.zarr")
    synth.generate(url, items=N_ITEMS, captions_per_item=4, missing={"dlib_face": 0.5, "vggish": 0.2}, images=60,
                   seed=7, small=True)
    return url


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, args",
    [
        ("mee", ["--epochs", "8", "--batch-size", "32", "--lr", "4e-4"]),
        ("tmass", ["--epochs", "6", "--batch-size", "32", "--lr", "1e-4"]),
        ("xpool", ["--epochs", "6", "--batch-size", "32", "--lr", "1e-4"]),
    ],
)
def test_model_learns_synthetic_store(model, args, store_url, tmp_path):
    run = tmp_path / model
    assert main([model, "--store", store_url, "--out", str(run), "--device", "cpu", "--seed", "0", *args]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = metrics["n_videos"]
    assert n_test == N_ITEMS // 10
    r1 = metrics["t2v"]["R@1"]
    scale = 100.0 if metrics["t2v"]["R@50"] > 1.0 else 1.0  # metrics in % or as fractions
    chance = scale / n_test
    assert r1 > 3 * chance, f"{model}: test t2v R@1 {r1} not > 3x chance {chance:.3f}"
    if model == "mee":
        assert r1 < scale, "retrieval on the synthetic store should not be trivial"
