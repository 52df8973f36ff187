"""train.stream: block-wise streaming reads with a bounded shuffle buffer (store larger than the memory budget)."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from store import FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status
from train.stream import BlockStream, StreamConfig, from_budget, row_bytes

RANDOM = {"weights": {"random": True, "seed": 0}, "preset": "test"}
A = FeatureSpec("resnet152", dim=32, max_steps=8)
B = FeatureSpec("vggish", dim=16, max_steps=4, dtype="float32", modality="audio")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    n = 600
    s = FeatureStore.create(tmp_path_factory.mktemp("st") / "s.zarr", [ItemRecord(f"v{i}", "/x") for i in range(n)],
                            features=[(A, RANDOM), (B, RANDOM)], shard_rows=64)
    rng = np.random.default_rng(0)
    for spec in (A, B):
        rows = []
        for i in range(n):
            if i % 9 == 4:
                rows.append(FeatureRows.absent(spec, "none"))
            else:
                k = int(rng.integers(1, spec.max_steps + 1))
                rows.append(FeatureRows(Status.OK, rng.standard_normal((k, spec.dim)), np.arange(k, dtype=np.float32)))
        s.write_block(spec.name, 0, rows)
    s.pack_ready(partial=True)
    return FeatureStore.open(s.url)


def test_full_buffer_gives_the_in_memory_batches(store: FeatureStore) -> None:
    rows = np.arange(5, 590, 2)
    cfg = StreamConfig(batch_size=50, buffer_rows=10_000, seed=3)
    whole = store.read_many(["resnet152", "vggish"], rows)  # the cached path: everything in memory
    for epoch in (0, 1):
        perm = np.random.default_rng([3, epoch]).permutation(len(rows))
        got = list(BlockStream(store, ["resnet152", "vggish"], rows, cfg).epoch(epoch))
        assert len(got) == -(-len(rows) // 50)
        for k, batch in enumerate(got):
            want = perm[k * 50:(k + 1) * 50]
            for f in ("resnet152", "vggish"):
                np.testing.assert_array_equal(batch[f].rows, rows[want])
                np.testing.assert_array_equal(batch[f].values, whole[f].values[want])
                np.testing.assert_array_equal(batch[f].mask, whole[f].mask[want])
                np.testing.assert_array_equal(batch[f].available, whole[f].available[want])


def test_small_buffer_yields_every_row_once_with_its_own_data(store: FeatureStore) -> None:
    rows = np.arange(600)
    cfg = StreamConfig(batch_size=32, buffer_rows=100, block_rows=64, prefetch=2, workers=2, seed=1)
    stream = BlockStream(store, ["resnet152", "vggish"], rows, cfg)
    whole = store.read_many(["resnet152", "vggish"], rows)
    orders = []
    for epoch in (0, 1):
        seen = []
        for batch in stream.epoch(epoch):
            r = batch["resnet152"].rows
            np.testing.assert_array_equal(r, batch["vggish"].rows)  # the features stay aligned
            np.testing.assert_array_equal(batch["resnet152"].values, whole["resnet152"].values[r])
            np.testing.assert_array_equal(batch["vggish"].time, whole["vggish"].time[r])
            seen.extend(r.tolist())
        assert sorted(seen) == rows.tolist()
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled per epoch
    assert orders[0][:100] != sorted(orders[0][:100])  # shuffled within the buffer, not block order


def test_memory_stays_within_the_budget(tmp_path: Path) -> None:
    n = 2048
    wide_a = FeatureSpec("resnet152", dim=256, max_steps=8)  # 4 KiB rows: inner chunks of 16 rows
    wide_b = FeatureSpec("vggish", dim=64, max_steps=4, dtype="float32", modality="audio")
    store = FeatureStore.create(tmp_path / "big.zarr", [ItemRecord(f"v{i}", "/x") for i in range(n)],
                                features=[(wide_a, RANDOM), (wide_b, RANDOM)], shard_rows=256)
    rng = np.random.default_rng(1)
    for spec in (wide_a, wide_b):
        store.write_block(spec.name, 0, [FeatureRows(Status.OK, rng.standard_normal((3, spec.dim)), np.arange(3.0))
                                         for _ in range(n)])
    store.pack_ready(partial=True)
    per = row_bytes(store, ["resnet152", "vggish"])
    data = per * store.n_items
    budget = data // 4  # a budget four times smaller than the features
    cfg = from_budget(store, ["resnet152", "vggish"], budget, batch_size=32, seed=0)
    assert cfg.buffer_rows < store.n_items
    stream = BlockStream(store, ["resnet152", "vggish"], np.arange(store.n_items), cfg)
    sum(1 for _ in stream.epoch(0))  # warm-up: lazy imports and zarr's caches are not the data
    tracemalloc.start()
    n = sum(len(b["resnet152"].rows) for b in stream.epoch(1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == store.n_items
    assert peak < 2 * budget, (peak, budget, data)  # reads, buffer and one batch; the whole feature is 4x budget


def test_small_buffer_keeps_every_field_of_slot_and_extra_features(tmp_path: Path) -> None:
    from store import ExtraSpec

    face = FeatureSpec("dlib_face", dim=8, max_steps=3, slots=2, modality="face", extras=(ExtraSpec("box", (4,)),))
    n = 300
    store = FeatureStore.create(tmp_path / "f.zarr", [ItemRecord(f"v{i}", "/x") for i in range(n)],
                                features=[(face, RANDOM), (B, RANDOM)], shard_rows=64)
    rng = np.random.default_rng(4)
    store.write_block("dlib_face", 0, [FeatureRows.absent(face, "no_face") if i % 5 == 2 else FeatureRows(
        Status.OK, rng.standard_normal((2, 2, 8)), np.arange(2, dtype=np.float32),
        extras={"box": rng.standard_normal((2, 2, 4)).astype(np.float32)}) for i in range(n)])
    store.write_block("vggish", 0, [FeatureRows(Status.OK, rng.standard_normal((3, 16)), np.arange(3.0))
                                    for _ in range(n)])
    store.pack_ready(partial=True)
    rows = np.arange(0, n, 3)
    whole = store.read_many(["dlib_face", "vggish"], rows)
    cfg = StreamConfig(batch_size=16, buffer_rows=40, block_rows=64, seed=2)
    seen = []
    for batch in BlockStream(store, ["dlib_face", "vggish"], rows, cfg).epoch(0):
        at = np.searchsorted(rows, batch["dlib_face"].rows)
        for f in ("dlib_face", "vggish"):
            b, w = batch[f], whole[f]
            for name in ("rows", "values", "mask", "time", "status", "available", "slot_mask"):
                got, want = getattr(b, name), getattr(w, name)
                assert (got is None) == (want is None), name
                if want is not None:
                    np.testing.assert_array_equal(got, want[at], err_msg=f"{f}.{name}")
            assert b.extras.keys() == w.extras.keys()
            for k in w.extras:
                np.testing.assert_array_equal(b.extras[k], w.extras[k][at])
        seen += batch["vggish"].rows.tolist()
    assert sorted(seen) == rows.tolist()
