"""Object-store settings given only by `--storage-options` (no AWS_* variables anywhere): create + extract with
local Ray workers, `tvr-store info`, training and evaluation against the moto server of tests/_s3.py; no secret
reaches the store's metadata, the run folder or the output."""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._s3 import BUCKET, S3Server, objects, s3_server  # noqa: F401 (s3_server: the fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SECRET = "s3cr3t-never-shown"


@pytest.fixture(scope="module")
def bare_s3(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[dict[str, object]]:
    """The server with every AWS_* variable removed before Ray starts; the options that reach it."""
    import s3fs

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    s3fs.S3FileSystem.clear_instance_cache()
    request.getfixturevalue("ray_session")  # started now: its workers see no endpoint or credentials either
    try:
        yield {"key": "testing", "secret": SECRET,
               "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}
    finally:
        os.environ.update(saved)


def _run(main: object, argv: list[str]) -> tuple[int, str]:
    """A CLI main in-process: exit code and everything it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)  # type: ignore[operator]
    return code, out.getvalue()


def test_extract_info_and_choices_with_options_only(bare_s3: dict[str, object], s3_server: S3Server,
                                                    tmp_path: Path) -> None:
    from pipelines.cli import main as extract_main
    from store.cli import main as store_main
    from store.zarr_store import FeatureStore
    from tests._media import tiny_video
    from tests._pipelines import PLUGIN

    rows = []
    for i in range(3):
        v = tiny_video(tmp_path / f"v{i}.mkv", 5 + i, size=(12, 16))
        rows.append({"id": f"v{i}", "path": str(v.path), "captions": [f"video {i}", f"clip {i}"]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    url, opts = f"s3://{BUCKET}/opts.zarr", json.dumps(bare_s3)
    code, out = _run(extract_main, [str(tmp_path / "m.jsonl"), "--store", url, "--features", "test_mean,test_caption",
                                    "--plugins", PLUGIN, "--no-progress", "--storage-options", opts])
    assert code == 0, out
    (tmp_path / "opts.json").write_text(opts)  # the file form keeps credentials off the command line
    code, info = _run(store_main, ["info", url, "--json", "--storage-options", str(tmp_path / "opts.json")])
    assert code == 0, info
    doc = json.loads(info)
    assert doc["features"]["test_mean"] == {"ok": 3, "absent": 0, "failed": 0, "pending": 0}
    assert doc["features"]["test_caption"]["ok"] == 6
    fs = FeatureStore.open(url, "r+", storage_options=bare_s3)
    fs.set_choices(["v1"], [["v0#0", "v1#1"]], [1])
    code, info = _run(store_main, ["info", url, "--json", "--storage-options", opts])
    assert code == 0 and json.loads(info)["choices"]["questions"] == 1 and json.loads(info)["choices"]["bytes"] > 0
    assert SECRET not in out + info
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                      aws_secret_access_key=SECRET, region_name="us-east-1")
    for key in objects_with(s3, "opts.zarr/"):
        if key.endswith("zarr.json"):
            assert SECRET.encode() not in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key


def objects_with(s3: object, prefix: str) -> list[str]:
    """Keys under `prefix` listed with an explicit client (the environment holds no credentials)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def test_train_and_eval_with_options_only(bare_s3: dict[str, object], tmp_path: Path) -> None:
    import s3fs
    import yaml

    from store import synth
    from train.cli import main as train_main

    synth.generate(tmp_path / "synth.zarr", items=40, captions_per_item=2, images=4, seed=0, small=True, choices=3)
    s3fs.S3FileSystem(**bare_s3).put(str(tmp_path / "synth.zarr"), f"{BUCKET}/synth-opts.zarr", recursive=True)
    url, run, opts = f"s3://{BUCKET}/synth-opts.zarr", tmp_path / "run", json.dumps(bare_s3)
    code, out = _run(train_main, ["mee", "--store", url, "--out", str(run), "--epochs", "1", "--batch-size", "8",
                                  "--device", "cpu", "--storage-options", opts])
    assert code == 0, out
    saved = (run / "config.yaml").read_text()
    assert yaml.safe_load(saved)["store"] == url and SECRET not in saved and "storage_options" not in saved
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["multiple_choice"]["n_questions"] == 4
    code, out2 = _run(train_main, ["eval", str(run), "--storage-options", opts])
    assert code == 0, out2
    assert json.loads((run / "metrics_test.json").read_text())["t2v"] == metrics["t2v"]
    assert SECRET not in out + out2
    assert all(SECRET not in p.read_text(errors="ignore") for p in run.iterdir() if p.suffix in (".yaml", ".json",
                                                                                                 ".jsonl"))
