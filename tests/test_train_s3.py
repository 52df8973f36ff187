"""`tvr-train` training and evaluating from an s3:// store on a real S3-compatible server (tests/_s3.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from store import synth
from tests._s3 import S3Server, s3_server  # noqa: F401 (s3_server: the fixture)
from train.cli import main

pytestmark = pytest.mark.slow


def test_train_and_eval_from_an_s3_store(s3_server: S3Server, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import s3fs

    url = "s3://tvr/synth.zarr"
    # written locally and uploaded (row by row through the dev server takes ~50 s; tests/test_pipelines_s3.py
    # covers writing into S3), then trained and evaluated straight from S3
    synth.generate(tmp_path / "synth.zarr", items=40, captions_per_item=2, images=4, seed=0, small=True, choices=3)
    s3fs.S3FileSystem().put(str(tmp_path / "synth.zarr"), "tvr/synth.zarr", recursive=True)
    run = tmp_path / "run"  # the run folder stays local; only the store is remote
    assert main(["mee", "--store", url, "--out", str(run), "--epochs", "1", "--batch-size", "8",
                 "--device", "cpu"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["store"] == url
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_videos"] == 4 and metrics["n_queries"] == 8  # the test split: 4 videos x 2 captions
    assert metrics["multiple_choice"]["n_questions"] == 4  # the store's question set, read through FeatureStore
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0  # the store comes from the run's config.yaml
    again = json.loads((run / "metrics_test.json").read_text())
    assert again["t2v"] == metrics["t2v"] and again["multiple_choice"] == metrics["multiple_choice"]


def test_a_missing_s3_store_is_named_with_the_fix(s3_server: S3Server, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mee", "--store", "s3://tvr/nothing-here.zarr", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "s3://tvr/nothing-here.zarr" in err and "tvr-extract" in err, err
    assert main(["mee", "--store", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "none.zarr: no tvr store here (the path does not exist)" in err and "tvr-extract" in err, err
