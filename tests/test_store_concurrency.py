"""Concurrent writers, packers and drivers on one store (processes, kill -9), locks and creation races."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from store import FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status, StoreError
from store import zarr_store
from store._create import PARTIAL_MARKER, StoreExistsError

ROOT = Path(__file__).resolve().parents[1]
RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
SPEC = FeatureSpec("resnet152", dim=6, max_steps=5)
AUDIO = FeatureSpec("vggish", dim=3, max_steps=2, dtype="float32", modality="audio")


def result(row: int) -> FeatureRows:
    """Deterministic row content (ABSENT every 7th row), the independent expectation of every test here."""
    if row % 7 == 6:
        return FeatureRows.absent(SPEC, "no_motion", f"row {row}")
    n = row % 5 + 1
    return FeatureRows(Status.OK, np.random.default_rng(row).standard_normal((n, 6)), np.arange(n) * 0.5)


def check_rows(s: FeatureStore, rows: range) -> None:
    b = s.read("resnet152", list(rows))
    for i, row in enumerate(rows):
        r = result(row)
        assert b.status[i] == r.status, row
        n = len(r.values)
        np.testing.assert_array_equal(b.values[i, :n], r.values.astype(np.float16).astype(np.float32))
        assert b.mask[i].sum() == (n if r.status == Status.OK else 0)


def run_py(code: str, **fmt: object) -> subprocess.Popen:
    src = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(code).format(**fmt)
    return subprocess.Popen([sys.executable, "-c", src])


_WRITER = """
import random
from tests.test_store_concurrency import result
from store import FeatureStore
s = FeatureStore.open({url!r}, "r+")
rows = list(range({k}, {n}, {procs}))
random.Random({k}).shuffle(rows)
for i, row in enumerate(rows):
    r = result(row)
    if r.status == 2:
        s.write("resnet152", row, r)
    elif row % 11 == 4:
        s.write_failed("resnet152", row, "oom", "first try")
        s.write("resnet152", row, r)  # a retry that succeeds: the newer staged object wins
    else:
        s.write("resnet152", row, r)
    if i % 5 == 0:
        s.pack_ready()  # every writer also packs: shards are packed while others still write
"""


@pytest.mark.slow
def test_four_writer_processes_random_order_lose_nothing(tmp_path: Path) -> None:
    n, procs = 240, 4
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord(f"v{i}", f"/{i}") for i in range(n)], shard_rows=8)
    s.ensure_feature(SPEC, RANDOM)
    ps = [run_py(_WRITER, url=s.url, k=k, n=n, procs=procs) for k in range(procs)]
    assert [p.wait(timeout=300) for p in ps] == [0] * procs
    s.pack_ready(partial=True)
    assert s.staged_count("resnet152") == 0 and not (Path(s.url) / ".tvr").exists()
    check_rows(FeatureStore.open(s.url), range(n))
    assert FeatureStore.open(s.url).coverage()["resnet152"]["pending"] == 0


_PACKER = """
import os, signal
import zarr.storage
from pathlib import Path
from store import FeatureStore
count = [0]
def dying(real):
    def f(*a, **kw):
        count[0] += 1
        if count[0] == {k}:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 at this write or delete of the packing
        return real(*a, **kw)
    return f
zarr.storage.LocalStore.set = dying(zarr.storage.LocalStore.set)
Path.unlink = dying(Path.unlink)
FeatureStore.open({url!r}, "r+").pack_ready()
"""


def staged_store(path: Path, n: int, two_writers: bool = False) -> FeatureStore:
    """Every row staged; with `two_writers`, each row is written twice (a stale value, then its result) by two
    writers in turn, so each shard has two segments and each one holds the newer record of some rows."""
    s = FeatureStore.create(path, [ItemRecord(f"v{i}", f"/{i}") for i in range(n)], shard_rows=8)
    s.ensure_feature(SPEC, RANDOM)
    other = FeatureStore.open(s.url, "r+") if two_writers else s
    for row in range(n):
        first, last = (s, other) if row % 2 else (other, s)
        if two_writers:
            first.write("resnet152", row, result(row + 1000))
        last.write("resnet152", row, result(row))
    return s


@pytest.mark.slow
@pytest.mark.parametrize("staging", ["segments", "files"])  # local file system / shared one (TVR_STAGING=files)
def test_kill_9_at_random_points_of_packing_then_resume_is_clean(tmp_path: Path, staging: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if staging == "files":
        monkeypatch.setenv("TVR_STAGING", "files")  # the packer subprocesses inherit it
    n = 40  # 5 shards; a pack of one shard = 6 array writes, a marker, 2 segment + 1 marker deletions, lock release
    clean = staged_store(tmp_path / "clean.zarr", n)
    clean.pack_ready()
    want = clean.read("resnet152")
    rng = random.Random(0)
    ops = 51 if staging == "segments" else 121  # files: 16 staged files per shard instead of 2 segments
    for trial, k in enumerate(sorted(rng.sample(range(1, ops), 8))):
        s = staged_store(tmp_path / f"k{trial}.zarr", n, two_writers=True)
        staged = list((Path(s.url) / ".tvr" / "staging").rglob("*.row"))
        assert len(staged) == (2 * n if staging == "files" else 0)
        p = run_py(_PACKER, url=s.url, k=k)
        assert p.wait(timeout=120) == -signal.SIGKILL
        mid = FeatureStore.open(s.url)  # consistent at the crash: every row as written, packed or staged
        check_rows(mid, range(n))
        FeatureStore.open(s.url, "r+").pack_ready()  # the rerun: stale pack lock of the dead pid is broken
        got = FeatureStore.open(s.url)
        assert got.staged_count("resnet152") == 0, k
        b = got.read("resnet152")
        for key in ("values", "mask", "time", "status"):
            np.testing.assert_array_equal(getattr(b, key), getattr(want, key))
        assert list(got.reasons("resnet152")) == list(clean.reasons("resnet152"))


_ADDER = """
from store import FeatureStore, ItemRecord
s = FeatureStore.open({url!r}, "r+")
for j in range(4):
    s.add_items([ItemRecord(f"{prefix}{{j}}", "/x")])
"""
_FEATURE = """
from store import FeatureStore, FeatureSpec
s = FeatureStore.open({url!r}, "r+")
s.ensure_feature(FeatureSpec("vggish", dim=3, max_steps=2, dtype="float32", modality="audio"),
                 {{"weights": {{"random": True, "seed": 0}}, "preset": "test"}})
"""


@pytest.mark.slow
def test_concurrent_add_items_and_ensure_feature_keep_the_store_whole(tmp_path: Path) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord("v0", "/0")])
    s.ensure_feature(SPEC, RANDOM)
    ps = [run_py(_ADDER, url=s.url, prefix=p) for p in ("a", "b", "c")] + [run_py(_FEATURE, url=s.url)]
    assert [p.wait(timeout=300) for p in ps] == [0] * 4
    again = FeatureStore.open(s.url)  # opens: every array has the item count
    assert again.n_items == 13 and sorted(again.items().id) == sorted(
        ["v0"] + [f"{p}{j}" for p in "abc" for j in range(4)])
    assert again.features == ["resnet152", "vggish"]
    assert again.status("vggish").shape == again.status("resnet152").shape == (13,)
    s.write("resnet152", 0, result(0))  # our handle was opened before the others' changes: still writes fine
    check_rows(FeatureStore.open(s.url), range(1))


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_open_waits_while_another_driver_creates_a_feature_group(tmp_path: Path, mode: str) -> None:
    import shutil
    import threading

    import zarr

    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord("v0", "/0")])
    creator, got = FeatureStore.open(s.url, "r+"), {}

    def opener() -> None:
        try:
            got["features"] = FeatureStore.open(s.url, mode).features  # type: ignore[arg-type]
        except StoreError as e:
            got["error"] = str(e)

    with creator._lock("structure", "structural (add_items / ensure_feature)"):
        # ensure_feature's state between creating the group and writing its attributes (they come last)
        zarr.open_group(s.url, mode="r+").create_group("resnet152")
        t = threading.Thread(target=opener)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), got  # waits for the structural change instead of calling the group damaged
        shutil.rmtree(tmp_path / "s.zarr" / "resnet152")
        creator._create_feature(SPEC, RANDOM)
    t.join(timeout=60)
    assert got == {"features": ["resnet152"]}


def test_add_items_uses_the_store_on_disk_not_a_cached_length(tmp_path: Path) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord("v0", "/0")])
    a, b = FeatureStore.open(s.url, "r+"), FeatureStore.open(s.url, "r+")
    a.add_items([ItemRecord("a", "/a")])
    b.add_items([ItemRecord("b", "/b")])  # b still believes the store has 1 item
    assert list(FeatureStore.open(s.url).items().id) == ["v0", "a", "b"]
    with pytest.raises(StoreError, match="duplicate item id 'a'"):
        b.add_items([ItemRecord("a", "/a")])


def test_structural_lock_names_holder_and_breaks_when_holder_is_dead(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord("v0", "/0")])
    holder = run_py("""
        import time
        from store import FeatureStore
        lock = FeatureStore.open({url!r}, "r+")._lock("structure", "structural")
        lock.acquire()
        print("held", flush=True)
        time.sleep(60)
        """, url=s.url)
    lock_file = Path(s.url) / ".tvr" / "locks" / "structure.lock"
    for _ in range(200):
        if lock_file.exists() and lock_file.read_text():
            break
        time.sleep(0.05)
    held = json.loads(lock_file.read_text())
    assert held["pid"] == holder.pid and held["host"] == socket.gethostname()
    monkeypatch.setattr(zarr_store, "LOCK_TIMEOUT", 0.3)
    with pytest.raises(StoreError, match=rf"structural .*lock is held by host {socket.gethostname()} pid "
                                         rf"{holder.pid}.*delete .*structure.lock"):
        s.add_items([ItemRecord("v1", "/1")])
    holder.send_signal(signal.SIGKILL)  # kill -9 while holding it
    holder.wait(timeout=30)
    s.add_items([ItemRecord("v1", "/1")])  # a dead holder on this host: the lock is stale and broken
    assert FeatureStore.open(s.url).n_items == 2 and not lock_file.exists()


_CREATOR = """
import sys, time
from store import FeatureStore, ItemRecord, FeatureSpec
from store._create import StoreExistsError
time.sleep(max(0.0, {start} - time.time()))
try:
    FeatureStore.create({url!r}, [ItemRecord(f"{tag}{{i}}", "/x") for i in range(50)],
                        features=[(FeatureSpec("resnet152", dim=6, max_steps=5),
                                   {{"weights": {{"random": True, "seed": 0}}}})])
except StoreExistsError as e:
    print("LOST:", e, flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_creation_race_loser_gets_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "race.zarr")
    start = time.time() + 2.0
    ps = [run_py(_CREATOR, url=url, start=start, tag=t) for t in ("a", "b", "c")]
    codes = sorted(p.wait(timeout=120) for p in ps)
    assert codes == [0, 3, 3]
    s = FeatureStore.open(url)
    assert s.n_items == 50 and s.features == ["resnet152"] and len({i[0] for i in s.items().id}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.zarr"]  # no .partial-* left behind
    assert not (Path(url) / PARTIAL_MARKER).exists()


def test_creation_removes_only_its_own_dead_temp_folders(tmp_path: Path) -> None:
    target = tmp_path / "x.zarr"
    backup = tmp_path / "x.zarr.partial-backup"  # the user's, no marker
    backup.mkdir()
    (backup / "precious.txt").write_text("keep")
    dead = tmp_path / "x.zarr.partial-999999-deadbeef"  # tvr's, its process is gone
    dead.mkdir()
    (dead / PARTIAL_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345}))
    live = tmp_path / "x.zarr.partial-live"  # tvr's, from a process still running (this one)
    live.mkdir()
    (live / PARTIAL_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    FeatureStore.create(target, [ItemRecord("v0", "/0")])
    assert (backup / "precious.txt").read_text() == "keep" and live.exists() and not dead.exists()
    with pytest.raises(StoreExistsError, match="already exists"):
        FeatureStore.create(target, [ItemRecord("v0", "/0")])


def test_interrupted_add_items_is_repaired_on_the_next_write_open(tmp_path: Path) -> None:
    s = FeatureStore.create(tmp_path / "s.zarr", [ItemRecord("v0", "/0"), ItemRecord("v1", "/1")])
    s.ensure_feature(SPEC, RANDOM)
    s.write("resnet152", 1, result(1))
    s.pack_ready(partial=True)
    import zarr

    g = zarr.open_group(s.url, mode="r+")
    for name in ("values", "status", "mask"):  # add_items died after growing some feature arrays
        a = g["resnet152"][name]
        a.resize((5, *a.shape[1:]))
    g["item_path"].resize((5,))
    with pytest.raises(StoreError, match="add_items was interrupted.*mode='r\\+'"):
        FeatureStore.open(s.url)
    fixed = FeatureStore.open(s.url, "r+")
    assert fixed.n_items == 2 and fixed.status("resnet152").tolist() == [0, 1]
    check_rows(FeatureStore.open(s.url), range(1, 2))


def test_pack_lock_of_another_host_is_respected_until_stale(tmp_path: Path) -> None:
    s = staged_store(tmp_path / "s.zarr", 8)  # one shard, all rows final
    lock = Path(s.url) / ".tvr" / "locks" / "pack-resnet152-0.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "time": time.time(), "token": "x"}))
    assert s.pack_ready() == 0 and s.staged_count("resnet152") == 8  # someone may be packing it right now
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "time": time.time() - 3600, "token": "x"}))
    assert s.pack_ready() == 1 and s.staged_count("resnet152") == 0  # an hour-old pack lock: its packer died
    check_rows(FeatureStore.open(s.url), range(8))
