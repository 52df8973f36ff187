"""store/_pack.py: a shard of finished rows is written as one raw object, byte for byte what zarr writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from store import FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status
from store._pack import _write_raw_shard


@pytest.mark.parametrize("rows, inner, shard, index_location", [
    (200, 1, 256, "end"),  # the last shard: chunks past the array's end stay absent
    (512, 1, 256, "end"),
    (37, 4, 16, "end"),  # several rows per inner chunk; the last one partial (padded with the fill value)
    (30, 2, 8, "start"),
])
def test_raw_shard_is_the_shard_zarr_writes(tmp_path: Path, rows: int, inner: int, shard: int,
                                            index_location: str) -> None:
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    x = np.random.default_rng(rows).standard_normal((rows, 3, 5)).astype(np.float16)
    made = {}
    for name in ("zarr", "raw"):
        codec = ShardingCodec(chunk_shape=(inner, 3, 5), codecs=[BytesCodec()],
                              index_codecs=[BytesCodec(), Crc32cCodec()], index_location=index_location)
        a = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=(rows, 3, 5), chunks=(shard, 3, 5),
                              dtype="float16", fill_value=float("nan"), serializer=codec, compressors=None)
        for s in range(-(-rows // shard)):
            sel = slice(s * shard, min(rows, (s + 1) * shard))
            if name == "zarr":
                a.with_config({"write_empty_chunks": True})[sel] = x[sel]
            else:
                assert _write_raw_shard(a, s, x[sel])
        made[name] = a
    np.testing.assert_array_equal(made["raw"][:], x)
    for s in range(-(-rows // shard)):
        key = f"c/{s}/0/0"
        assert (tmp_path / "raw.zarr" / key).read_bytes() == (tmp_path / "zarr.zarr" / key).read_bytes()


def test_compressed_layouts_are_left_to_zarr(tmp_path: Path) -> None:
    a = zarr.create_array(str(tmp_path / "z.zarr"), shape=(8, 4), chunks=(8, 4), shards=(8, 4), dtype="uint8",
                          compressors=[{"name": "zstd", "configuration": {"level": 1}}])
    assert not _write_raw_shard(a, 0, np.ones((8, 4), np.uint8))
    assert not (tmp_path / "z.zarr" / "c").exists()


def test_pack_of_finished_and_unfinished_shards_reads_back(tmp_path: Path) -> None:
    spec = FeatureSpec("resnet152", dim=16, max_steps=4)
    s = FeatureStore.create(str(tmp_path / "s.zarr"), [ItemRecord(f"v{i}", f"/v{i}.mp4") for i in range(20)],
                            shard_rows=8)
    s.ensure_feature(spec, {"weights": {"random": True, "seed": 0}})
    rng = np.random.default_rng(0)
    want = {r: rng.standard_normal((1 + r % 4, 16)).astype(np.float16) for r in range(20) if r != 13}
    for r, v in want.items():
        s.write("resnet152", r, FeatureRows(Status.OK, v, np.arange(len(v), dtype=np.float32)))
    assert s.pack_ready() == 2  # shards 0 and 1 are all OK (the raw path); shard 2 has a PENDING row
    assert s.pack_ready(partial=True) == 1  # zarr's path, which leaves the PENDING row's chunk out
    b = FeatureStore.open(str(tmp_path / "s.zarr")).read("resnet152")
    for r, v in want.items():
        np.testing.assert_array_equal(b.values[r, : len(v)], v.astype(np.float32))
    assert b.status[13] == Status.PENDING and s.staged_count("resnet152") == 0
