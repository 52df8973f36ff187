"""s3:// stores against a real S3-compatible server (moto in server mode on 127.0.0.1: tests/_s3.py)."""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from store import CaptionRecord, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status  # noqa: E402
from store.cli import main  # noqa: E402
from tests._s3 import S3Server, objects, s3_server  # noqa: E402, F401 (s3_server: the fixture)

RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
SPEC = FeatureSpec("resnet152", dim=6, max_steps=4)
TEXT = FeatureSpec("clip_text", dim=3, max_steps=1, dtype="float32", modality="text", axis="caption", chunk_rows=4)


def result(row: int) -> FeatureRows:
    n = row % 4 + 1
    return FeatureRows(Status.OK, np.random.default_rng(row).standard_normal((n, 6)), np.arange(n) * 0.5)


@pytest.mark.slow
def test_s3_create_write_resume_pack_info_xarray(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    url = "s3://tvr/run1.zarr"
    n = 40
    items = [ItemRecord(f"v{i}", f"s3://tvr/videos/v{i}.mp4") for i in range(n)]
    caps = [CaptionRecord(f"v{i}#0", f"v{i}", f"text {i}") for i in range(n)]
    s = FeatureStore.create(url, items, caps, features=[(SPEC, RANDOM), (TEXT, RANDOM)], shard_rows=8)
    assert s.store_id and s._local_root is None
    for row in range(0, 30):  # a first run, "killed" after 30 rows: nothing packed yet
        s.write("resnet152", row, result(row))
    assert s.pack_ready() == 3  # shards 0-2 are final; shard 3 (rows 24-31) is not
    assert not any(k.startswith("run1.zarr/.tvr/staging/resnet152/0/") for k in objects(s3_server, "run1.zarr/"))

    again = FeatureStore.open(url, "r+")  # the rerun: plans from status, redoes only the PENDING rows
    calls = {"ls": 0}
    real = s3fs.S3FileSystem._lsdir

    async def counting(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls["ls"] += 1
        return await real(self, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_lsdir", counting)
    st = again.status("resnet152")
    assert calls["ls"] <= 4  # the staging area per in-flight shard, never one listing per item
    todo = np.flatnonzero(st == Status.PENDING)
    np.testing.assert_array_equal(todo, np.arange(30, n))
    for row in todo:
        again.write("resnet152", int(row), result(int(row)))
    for start in range(0, n, 4):
        again.write_block("clip_text", start, [FeatureRows(Status.OK, np.full((1, 3), float(start)), np.zeros(1))] * 4)
    again.pack_ready(partial=True)
    assert not [k for k in objects(s3_server, "run1.zarr/.tvr/") if "/staging/" in k]
    b = FeatureStore.open(url).read("resnet152")
    assert b.available.all()
    for row in range(n):
        r = result(row)
        np.testing.assert_array_equal(b.values[row, : len(r.values)], r.values.astype(np.float16).astype(np.float32))
    shards = objects(s3_server, "run1.zarr/resnet152/")
    assert len(shards) <= 8 * 5 + 9  # one object per shard and array (+ metadata), not one per row

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["info", url, "--json"]) == 0
    doc = json.loads(out.getvalue())
    assert doc["features"]["resnet152"] == {"ok": n, "absent": 0, "failed": 0, "pending": 0}
    assert doc["layout"]["features"]["resnet152"]["files"] == len(shards)
    ds = FeatureStore.open(url).to_xarray("resnet152")
    np.testing.assert_array_equal(ds["status"].values, np.ones(n))
    assert float(ds["values"].sel(item="v3").isel(resnet152_step=0, resnet152_dim=0)) == pytest.approx(
        float(result(3).values[0, 0].astype(np.float16)))
    again.set_choices(["v1", "v2"], [["v1#0", "v2#0"], ["v1#0", "v2#0"]], [0, 1])  # under the S3 structural lock
    mc = FeatureStore.open(url).choices()
    np.testing.assert_array_equal(mc.items, [1, 2])
    np.testing.assert_array_equal(mc.captions, [[1, 2], [1, 2]])


@pytest.mark.slow
def test_s3_structural_lock_is_a_conditional_put(s3_server: S3Server) -> None:
    s = FeatureStore.create("s3://tvr/lock.zarr", [ItemRecord("v0", "/0")])
    a = s._lock("structure", "structural", timeout=0.2)
    b = FeatureStore.open("s3://tvr/lock.zarr", "r+")._lock("structure", "structural", timeout=0.2)
    assert a.try_acquire() and not b.try_acquire()  # the second create-only PUT is refused by the server
    with pytest.raises(Exception, match="lock is held by host"):
        b.acquire()
    a.release()
    assert b.try_acquire()
    b.release()
    FeatureStore.open("s3://tvr/lock.zarr", "r+").add_items([ItemRecord("v1", "/1")])
    assert FeatureStore.open("s3://tvr/lock.zarr").n_items == 2


_WRITER = """
import sys
import numpy as np
from store import FeatureRows, FeatureStore, Status
s = FeatureStore.open(sys.argv[1], "r+")
for row in map(int, sys.argv[2:]):
    s.write("resnet152", row, FeatureRows(Status.OK, np.ones((1, 6)), np.zeros(1)))
"""


@pytest.mark.slow
def test_rows_staged_by_another_process_are_seen_and_packed(s3_server: S3Server) -> None:
    """A driver sees rows its workers staged after its own last listing (no stale listing cache)."""
    import subprocess
    import sys
    from pathlib import Path

    url = "s3://tvr/others.zarr"
    s = FeatureStore.create(url, [ItemRecord(f"v{i}", f"/{i}") for i in range(6)], features=[(SPEC, RANDOM)],
                            shard_rows=8)
    s.write("resnet152", 0, result(0))
    assert (s.status("resnet152") == Status.OK).sum() == 1  # the driver lists the staging area once
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", _WRITER, url, "1", "2"], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": root})
    np.testing.assert_array_equal(np.flatnonzero(s.status("resnet152") == Status.OK), [0, 1, 2])
    s.pack_ready(partial=True)
    assert s.staged_count("resnet152") == 0
    assert not [k for k in objects(s3_server, "others.zarr/.tvr/") if "/staging/" in k]
    np.testing.assert_array_equal(np.flatnonzero(FeatureStore.open(url).status("resnet152") == Status.OK), [0, 1, 2])
