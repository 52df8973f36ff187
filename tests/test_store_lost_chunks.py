"""A lost data chunk or shard of an OK row is an error for every dtype (uint8 frames have no NaN fill value)."""
from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from store import FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status, StoreError
from store._shard_io import shard_layout
from store.maintain import repair, verify

RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
FRAMES = FeatureSpec("frames", dim=32768, max_steps=2, dtype="uint8", modality="frames")  # 64 KiB rows
BOX = FeatureSpec("dlib_face", dim=3, max_steps=2, slots=2, modality="face")


def frames_store(tmp_path: Path) -> FeatureStore:
    """4 packed uint8 rows in one shard of one-row inner chunks; row 1 is all black (zeros), row 3 PENDING."""
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord(f"v{i}", f"/{i}") for i in range(4)], shard_rows=4)
    s.ensure_feature(FRAMES, RANDOM)
    for row in range(3):
        v = np.full((2, FRAMES.dim), 0 if row == 1 else 10 * (row + 1), np.uint8)
        s.write("frames", row, FeatureRows(Status.OK, v, np.arange(2.0)))
    s.pack_ready(partial=True)
    return s


def drop_inner_chunk(s: FeatureStore, feature: str, array: str, row: int) -> None:
    """Mark the inner chunk holding `row` absent in its shard's index (its bytes lost), index checksum fixed."""
    lay = shard_layout(s._arrays[feature][array])
    assert lay is not None and lay.index_at_end and lay.index_crc
    path = Path(s.url) / lay.key(row // lay.shard_rows)
    raw = bytearray(path.read_bytes())
    ix = len(raw) - lay.index_bytes
    index = np.frombuffer(raw, dtype="<u8", count=2 * lay.chunks_per_shard, offset=ix).copy()
    k = row % lay.shard_rows // lay.inner_rows
    index[2 * k:2 * k + 2] = 2**64 - 1
    body = index.tobytes()
    raw[ix:] = body + np.uint32(google_crc32c.value(body)).tobytes()
    path.write_bytes(bytes(raw))


def test_black_uint8_rows_are_valid_and_a_lost_chunk_is_an_error(tmp_path: Path) -> None:
    s = frames_store(tmp_path)
    b = FeatureStore.open(s.url).read("frames")
    assert list(b.available) == [True, True, True, False] and (b.values[1] == 0).all()  # black frames are data
    drop_inner_chunk(s, "frames", "values", 2)
    r = FeatureStore.open(s.url)
    with pytest.raises(StoreError, match=r"rows \[2\] .*marked OK but their data is missing.*verify"):
        r.read("frames")
    assert r.read("frames", [0, 1]).available.all()  # other rows of the shard still read
    rep = verify(r)["frames"]
    assert rep.lost == [2]
    assert repair(FeatureStore.open(s.url, "r+"), {"frames": rep}) == 1
    assert list(FeatureStore.open(s.url).status("frames")) == [1, 1, 0, 0]  # PENDING: extraction redoes it


def test_a_lost_uint8_values_shard_is_an_error(tmp_path: Path) -> None:
    s = frames_store(tmp_path)
    lay = shard_layout(s._arrays["frames"]["values"])
    assert lay is not None
    (Path(s.url) / lay.key(0)).unlink()  # mask, time and status survive: only the pixels are gone
    with pytest.raises(StoreError, match=r"rows \[0, 1, 2\] .*data is missing"):
        FeatureStore.open(s.url).read("frames")


def test_lost_slot_mask_chunk_of_a_face_row_is_an_error(tmp_path: Path) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord(f"v{i}", f"/{i}") for i in range(2)], shard_rows=2)
    s.ensure_feature(BOX, RANDOM)
    for row in range(2):
        s.write("dlib_face", row, FeatureRows(Status.OK, np.ones((2, 2, 3)), np.arange(2.0),
                                              slot_mask=np.zeros((2, 2), bool)))  # steps with no face
    s.pack_ready(partial=True)
    assert FeatureStore.open(s.url).read("dlib_face").available.all()  # all-False slot masks are stored
    drop_inner_chunk(s, "dlib_face", "slot_mask", 1)  # tiny rows: one inner chunk holds both
    with pytest.raises(StoreError, match=r"rows \[0, 1\] .*data is missing"):
        FeatureStore.open(s.url).read("dlib_face")
