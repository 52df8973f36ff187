"""store._shard_io: bulk shard reads equal zarr's own reads (absent chunks/shards, ranges, scattered rows)."""
from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from zarr.core.sync import sync

import store._shard_io as sio
from store import FeatureSpec, StoreError
from tests._fakes import TinyStoreFactory

ZSTD = [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]


def _read(a: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Bulk read through both fetchers (zarr store gets, plain local file reads); they must agree."""
    lay = sio.shard_layout(a)
    assert lay is not None
    via_store = sio.decode(lay, rows, sync(sio.fetch(lay, rows)))
    local = sio.fetch_local(lay, rows)
    assert local is not None
    np.testing.assert_array_equal(sio.decode(lay, rows, local), via_store)
    return via_store


@pytest.fixture(params=["zstd", "raw"])
def arr(request: pytest.FixtureRequest, tmp_path: Path) -> zarr.Array:
    """A (1000, 3, 5) float16 array written by zarr itself: shards of 128 rows, inner chunks of 4 rows, holes."""
    a = zarr.create_array(str(tmp_path / "a.zarr"), shape=(1000, 3, 5), chunks=(4, 3, 5), shards=(128, 3, 5),
                          dtype="float16", fill_value=float("nan"),
                          compressors=ZSTD if request.param == "zstd" else None)
    data = np.random.default_rng(0).standard_normal((1000, 3, 5)).astype(np.float16)
    data[40:48] = np.nan  # two inner chunks equal to the fill value: zarr does not store them (absent in the index)
    data[256:384] = np.nan  # a whole shard of fill: no shard file at all
    a[:] = data
    return a


def test_reads_equal_zarr_for_ranges_scattered_rows_and_holes(arr: zarr.Array) -> None:
    assert not (Path(arr.store_path.store.root) / "c" / "2" / "0" / "0").exists()  # the absent shard
    rng = np.random.default_rng(1)
    cases = [np.arange(1000), np.arange(0, 128), np.arange(130, 150),  # whole array, a whole shard, part of one
             np.arange(36, 52), np.arange(250, 400), np.arange(997, 1000),  # absent chunks, absent shard, the tail
             np.sort(rng.choice(1000, 7, replace=False)),  # scattered: index + one range per chunk
             rng.choice(1000, 50), np.array([5, 3, 3, 900, 0]), np.zeros(0, np.int64)]  # unsorted, duplicates
    for rows in cases:
        np.testing.assert_array_equal(_read(arr, rows), arr.get_orthogonal_selection((rows,)))


def test_one_request_per_whole_shard_and_few_for_scattered_rows(arr: zarr.Array,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = sio._get

    async def counting(store, key, req=None):  # type: ignore[no-untyped-def]
        calls.append(req)
        return await real(store, key, req)

    monkeypatch.setattr(sio, "_get", counting)
    real_local = sio._get_local

    def counting_local(root, key, req=None, files=None):  # type: ignore[no-untyped-def]
        calls.append(req)
        return real_local(root, key, req, files)

    monkeypatch.setattr(sio, "_get_local", counting_local)
    _read(arr, np.arange(0, 256))  # two shards, 64 inner chunks
    assert len(calls) == 4 and calls == [None] * 4  # per fetcher: one request per shard
    calls.clear()
    _read(arr, np.array([3, 700]))  # two shards, one chunk each: index then the chunk's bytes
    assert len(calls) == 8


def test_damaged_index_checksum_and_truncated_shard_are_errors(arr: zarr.Array) -> None:
    f = Path(arr.store_path.store.root) / "c" / "0" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # flip a byte of the index: its crc32c no longer matches
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        _read(arr, np.arange(0, 128))
    with pytest.raises(ValueError, match="checksum"):
        _read(arr, np.array([5]))
    g = Path(arr.store_path.store.root) / "c" / "1" / "0" / "0"
    g.write_bytes(g.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        _read(arr, np.arange(128, 256))


def test_unsupported_layouts_fall_back_to_zarr(tmp_path: Path) -> None:
    plain = zarr.create_array(str(tmp_path / "p.zarr"), shape=(10, 2), chunks=(1, 2), dtype="float32")
    across = zarr.create_array(str(tmp_path / "x.zarr"), shape=(10, 4), chunks=(2, 2), shards=(4, 4),
                               dtype="float32")  # inner chunks split a trailing axis
    text = zarr.create_array(str(tmp_path / "t.zarr"), shape=(10,), chunks=(2,), shards=(4,), dtype=str)
    assert sio.shard_layout(plain) is None and sio.shard_layout(across) is None and sio.shard_layout(text) is None


def _drop_inner_chunk(shard: Path, inner: int, n_inner: int) -> None:
    """Mark one inner chunk absent in a shard's index (a lost chunk), keeping the index checksum valid."""
    raw = bytearray(shard.read_bytes())
    ib = n_inner * 16
    index = np.frombuffer(bytes(raw[-ib - 4:-4]), "<u8").reshape(-1, 2).copy()
    index[inner] = 2**64 - 1
    body = index.tobytes()
    raw[-ib - 4:] = body + np.uint32(google_crc32c.value(body)).tobytes()
    shard.write_bytes(bytes(raw))


def test_feature_store_reads_equal_zarr_and_a_lost_inner_chunk_of_an_ok_row_is_an_error(
        tmp_path: Path, tiny_store: TinyStoreFactory) -> None:
    spec = FeatureSpec("resnet152", dim=512, max_steps=8)  # 8 KiB rows: inner chunks of 8 rows
    n = 300  # rows of 1..8 steps, every 7th ABSENT; packed and reopened read-only
    s = tiny_store(n, features=[spec], captions=0, absent_every=7, shard_rows=128, seed=2, name="s.zarr")
    vals = zarr.open_array(str(tmp_path / "s.zarr" / "resnet152" / "values"), mode="r")
    for rows in (slice(0, n), slice(130, 170), [5, 290, 17]):
        b = s.read("resnet152", rows)
        want = vals.get_orthogonal_selection((b.rows,)).astype(np.float32)
        want[~b.available] = 0
        np.testing.assert_array_equal(b.values, want)
    inner = vals.metadata.codecs[0].chunk_shape[0]
    _drop_inner_chunk(tmp_path / "s.zarr" / "resnet152" / "values" / "c" / "1" / "0" / "0", 2, 128 // inner)
    lost = 128 + 2 * inner  # first row of the lost inner chunk; zarr reads it as the NaN fill too
    assert np.isnan(vals[lost]).all()
    for rows in (slice(0, n), slice(lost, lost + 1), [0, lost]):
        with pytest.raises(StoreError, match="data is missing"):
            s.read("resnet152", rows)
    s.read("resnet152", slice(0, 128))  # other shards still read


def test_an_inner_chunk_of_the_wrong_decoded_size_is_a_damaged_shard(arr: zarr.Array) -> None:
    from numcodecs import Zstd

    lay = sio.shard_layout(arr)
    assert lay is not None
    small = np.zeros(7, np.float16).tobytes()  # 14 bytes where an inner chunk holds 4 * 3 * 5 values (120 bytes)
    raw = np.frombuffer(Zstd(level=1).encode(small) if lay.zstd else small, np.uint8)
    index = np.full((lay.chunks_per_shard, 2), 2**64 - 1, np.uint64)
    index[0] = (0, len(raw))
    shard = sio._Shard(index, [(0, raw)])
    with pytest.raises(ValueError, match=r"inner chunk 0 decodes to 14 bytes, expected 120 \(damaged shard file\)"):
        sio.decode(lay, np.arange(4), (np.array([0]), [shard]))
    index[0] = (0, len(raw) + 8)  # the index points past the bytes fetched
    with pytest.raises(ValueError, match="lies outside the shard file"):
        sio.decode(lay, np.arange(4), (np.array([0]), [shard]))
