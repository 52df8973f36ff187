"""Local staging segments (store/_segment.py): framing, damage detection, live writers under packing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status, StoreError
from store import _segment

RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
SPEC = FeatureSpec("resnet152", dim=6, max_steps=5)


def ok(v: float) -> FeatureRows:
    return FeatureRows(Status.OK, np.full((2, 6), v), np.arange(2.0))


def new_store(tmp_path: Path, n: int = 8, shard_rows: int = 4) -> FeatureStore:
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord(f"v{i}", f"/{i}") for i in range(n)],
                            shard_rows=shard_rows)
    s.ensure_feature(SPEC, RANDOM)
    return s


def segments(s: FeatureStore, shard: int = 0) -> list[Path]:
    return sorted((Path(s.url) / ".tvr" / "staging" / "resnet152" / str(shard)).glob("*.seg"))


def test_one_segment_per_writer_and_shard_holds_every_write(tmp_path: Path) -> None:
    s = new_store(tmp_path)
    for row, v in ((0, 0.0), (1, 1.0), (2, 2.0), (1, 11.0)):  # row 1 twice: the newer record wins
        s.write("resnet152", row, ok(v))
    (seg,) = segments(s)  # four writes, one file
    assert s.staged_count("resnet152") == 4
    b = FeatureStore.open(s.url).read("resnet152", [0, 1, 2, 3])
    assert list(b.status) == [1, 1, 1, 0] and b.values[1, 0, 0] == 11.0 and b.values[2, 0, 0] == 2.0


def test_packer_consuming_a_live_writers_segment_loses_nothing(tmp_path: Path) -> None:
    s = new_store(tmp_path)
    other = FeatureStore.open(s.url, "r+")
    s.write("resnet152", 0, ok(1.0))
    assert other.pack_ready(partial=True) == 1 and not segments(s)  # s's open segment was consumed and deleted
    s.write("resnet152", 1, ok(2.0))  # s notices (st_nlink == 0 under its lock) and starts a new segment
    assert len(segments(s)) == 1
    other.pack_ready(partial=True)
    b = FeatureStore.open(s.url).read("resnet152", [0, 1])
    assert b.available.all() and list(b.values[:, 0, 0]) == [1.0, 2.0]


def test_damaged_segment_is_an_error_naming_it(tmp_path: Path) -> None:
    s = new_store(tmp_path)
    s.write("resnet152", 0, ok(1.0))
    s.write("resnet152", 1, ok(2.0))
    (seg,) = segments(s)
    raw = bytearray(seg.read_bytes())
    size0 = _segment.PREFIX.size + _segment.PREFIX.unpack_from(raw)[2]
    raw[size0 + _segment.PREFIX.size + 100] ^= 0xFF  # one flipped byte in the second record's body
    seg.write_bytes(bytes(raw))
    r = FeatureStore.open(s.url)
    assert list(r.status("resnet152")[:2]) == [1, 1]  # the listing reads prefixes only ...
    with pytest.raises(StoreError, match=rf"{seg.name}.*fails its checksum.*delete the segment"):
        r.read("resnet152", [1])  # ... the data read checks the checksum: never silently wrong values
    raw[size0] ^= 0xFF  # the second record's magic: no record starts there
    seg.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=rf"{seg.name} is damaged at byte {size0}"):
        r.status("resnet152")


def test_open_segments_per_writer_are_bounded(tmp_path: Path) -> None:
    n = 4 * (_segment.MAX_OPEN + 3)
    s = new_store(tmp_path, n=n, shard_rows=4)
    for row in range(0, n, 4):  # one row in each of MAX_OPEN + 3 shards
        s.write("resnet152", row, ok(float(row)))
    assert len(s._staging._writer._open) == _segment.MAX_OPEN  # least recently used segments were closed
    s.write("resnet152", 1, ok(-1.0))  # shard 0's segment was closed: a new one, both count
    assert len(segments(s, 0)) == 2
    s.pack_ready(partial=True)
    b = FeatureStore.open(s.url).read("resnet152")
    assert b.status.sum() == n // 4 + 1 and b.values[1, 0, 0] == -1.0 and b.values[n - 4, 0, 0] == n - 4


def test_shared_file_systems_stage_one_renamed_file_per_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVR_STAGING", "files")  # what a store on NFS/Lustre gets (segments_ok is False there)
    s = new_store(tmp_path)
    for row, v in ((0, 1.0), (1, 2.0), (1, 3.0)):
        s.write("resnet152", row, ok(v))
    folder = Path(s.url) / ".tvr" / "staging" / "resnet152" / "0"
    assert not segments(s) and len(list(folder.glob("*.row"))) == 3
    b = FeatureStore.open(s.url).read("resnet152", [0, 1])
    assert b.available.all() and list(b.values[:, 0, 0]) == [1.0, 3.0]
    assert s.pack_ready(partial=True) == 1 and not (Path(s.url) / ".tvr").exists()
    assert list(FeatureStore.open(s.url).read("resnet152", [0, 1]).values[:, 0, 0]) == [1.0, 3.0]


def test_segments_only_on_local_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {tmp_path}/shared nfs4 rw 0 0\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **kw: real(mounts if str(self) == "/proc/mounts" else self,
                                                                       *a, **kw))
    assert not _segment.segments_ok(tmp_path / "shared" / "s.zarr")  # the longest matching mount wins
    assert _segment.segments_ok(tmp_path / "sharedx")  # a sibling path is not under the nfs mount


def test_records_appended_after_a_packer_died_mid_deletion_still_count(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    s = new_store(tmp_path)
    a, b = FeatureStore.open(s.url, "r+"), FeatureStore.open(s.url, "r+")
    a.write("resnet152", 0, ok(1.0))
    b.write("resnet152", 0, ok(2.0))  # newer: wins
    b.write("resnet152", 1, ok(3.0))
    a.write("resnet152", 1, ok(4.0))  # newer: wins (each segment holds the newer record of one row)
    real, calls = Path.unlink, [0]

    class Died(Exception):
        pass

    def dying(self: Path, *args: object, **kw: object) -> None:
        if self.suffix == ".seg":
            calls[0] += 1
            if calls[0] == 2:
                raise Died  # the packer dies after deleting one of the two segments
        real(self, *args, **kw)

    monkeypatch.setattr(Path, "unlink", dying)
    with pytest.raises(Died):
        s.pack_ready(partial=True)
    monkeypatch.undo()
    (left,) = segments(s)
    assert len(list(left.parent.glob("packed-*.json"))) == 1  # the marker says what the pack consumed
    writer = a if any(left.name == name for _, name in a._staging._writer._open.values()) else b
    r = FeatureStore.open(s.url)
    assert r.staged_count("resnet152") == 0 and list(r.read("resnet152", [0, 1]).values[:, 0, 0]) == [2.0, 4.0]
    writer.write("resnet152", 2, ok(5.0))  # the live writer appends to its (consumed) segment: it counts
    assert FeatureStore.open(s.url).staged_count("resnet152") == 1
    s.pack_ready(partial=True)
    got = FeatureStore.open(s.url)
    assert list(got.read("resnet152", [0, 1, 2]).values[:, 0, 0]) == [2.0, 4.0, 5.0]
    assert not (Path(s.url) / ".tvr").exists()
