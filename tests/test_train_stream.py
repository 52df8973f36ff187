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


# ---- streamed training reads through tvr-train (train/stream_train.py) ---------------------------------------
@pytest.fixture(scope="module")
def synth_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from store import synth

    url = str(tmp_path_factory.mktemp("train") / "tiny.zarr")
    synth.generate(url, items=60, captions_per_item=3, missing={"dlib_face": 0.5, "vggish": 0.2}, images=12,
                   seed=0, small=True)
    return url


def _train(model: str, url: str, run: Path, *extra: str) -> int:
    from train.cli import main

    return main([model, "--store", url, "--out", str(run), "--epochs", "2", "--batch-size", "8", "--device", "cpu",
                 "--lr", "1e-3", *extra])


def _weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow  # four 2-epoch CLI runs
@pytest.mark.parametrize("model,sampling", [("xpool", "all_pairs"), ("mee", "per_video")])
def test_streamed_training_with_a_buffer_holding_everything_equals_the_cached_run(
        synth_url: str, tmp_path: Path, model: str, sampling: str) -> None:
    import torch
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"caption_sampling: {sampling}\n")
    assert _train(model, synth_url, tmp_path / "cached", "--config", str(cfg), "--train-reads", "cached") == 0
    assert _train(model, synth_url, tmp_path / "stream", "--config", str(cfg), "--train-reads", "stream",
                  "--cache-gb", "1") == 0
    a, b = _weights(tmp_path / "cached" / "last.pt"), _weights(tmp_path / "stream" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cached" / "metrics.jsonl").read_text() == (tmp_path / "stream" / "metrics.jsonl").read_text()
    saved = yaml.safe_load((tmp_path / "stream" / "config.yaml").read_text())
    assert saved["train_reads"] == "stream" and saved["cache_bytes"] == 2**30


def test_tvr_train_streams_when_the_features_exceed_cache_gb(synth_url: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert _train("mee", synth_url, tmp_path / "bad", "--cache-gb", "-1") == 2
    assert "--cache-gb must be >= 0" in capsys.readouterr().err
    assert _train("mee", synth_url, tmp_path / "small", "--cache-gb", "0.0001", "--epochs", "1") == 0
    err = capsys.readouterr().err
    assert "train reads: streamed within 0.1 MiB" in err and "epoch 1/1 loss" in err
    assert (tmp_path / "small" / "metrics.json").is_file()


def _pairs_store(path: Path, n: int = 2048, caps: int = 2) -> FeatureStore:
    """Items split 80/10/10 with `caps` captions each: a wide float16 frame feature, an audio one, a text one."""
    frames = FeatureSpec("resnet152", dim=512, max_steps=8)  # 8 KiB per row as stored: inner chunks of 8 rows
    audio = FeatureSpec("vggish", dim=32, max_steps=4, modality="audio")
    text = FeatureSpec("clip_text", dim=64, max_steps=1, dtype="float32", modality="text", axis="caption")
    split = ["train"] * 8 + ["val", "test"]
    from store import CaptionRecord

    store = FeatureStore.create(path, [ItemRecord(f"v{i}", "/x", split=split[i % 10]) for i in range(n)],
                                [CaptionRecord(f"v{i}#{k}", f"v{i}", "a caption") for i in range(n)
                                 for k in range(caps)],
                                features=[(frames, RANDOM), (audio, RANDOM), (text, RANDOM)], shard_rows=256)
    rng = np.random.default_rng(2)
    for spec in (frames, audio):
        store.write_block(spec.name, 0, [FeatureRows.absent(spec, "none") if spec is audio and i % 7 == 3 else
                                         FeatureRows(Status.OK, rng.standard_normal((3, spec.dim)), np.arange(3.0))
                                         for i in range(n)])
    store.write_block("clip_text", 0, [FeatureRows(Status.OK, rng.standard_normal((1, 64)), np.zeros(1))
                                       for _ in range(n * caps)])
    store.pack_ready(partial=True)
    return FeatureStore.open(path)


def _needs():  # type: ignore[no-untyped-def]
    from train.models._api import FeatureNeeds

    return FeatureNeeds(video=("resnet152", "vggish"), text="clip_text", text_key="clip_text", text_sequence=False)


@pytest.mark.parametrize("sampling", ["per_video", "all_pairs"])
def test_streamed_epoch_has_every_pair_once_with_the_cached_tensors_within_the_budget(
        tmp_path: Path, sampling: str) -> None:
    from train.data import StoreData, cache_need

    store = _pairs_store(tmp_path / "p.zarr")
    cached = StoreData(store, _needs(), cache_bytes=2**30)
    assert cached.stream is None
    features = sum(cache_need(store.spec(f), store.n_items) for f in ("resnet152", "vggish"))
    budget = features // 4  # a budget four times smaller than the features
    data = StoreData(store, _needs(), cache_bytes=budget)
    assert data.stream is not None and not data.video["resnet152"].cached  # val/test rows: cached if they fit
    want_items, want_caps = data.epoch_pairs(0, 5, 0.0, sampling)
    seen, n_batches = [], 0
    for text, video in data.train_batches(0, 5, 32, 0.0, sampling):
        n_batches += 1
        items, caps = data.stream.last
        seen += list(zip(items.tolist(), caps.tolist()))
        want_v, want_t = cached.video_batch(items), cached.text_batch(caps)
        assert video.keys() == want_v.keys() and text.keys() == want_t.keys()
        for k in want_v:
            assert torch_equal(video[k], want_v[k]), k
        assert torch_equal(text["clip_text"], want_t["clip_text"])
    assert n_batches == data.n_train_batches(32, 0.0, sampling)
    assert sorted(seen) == sorted(zip(want_items.tolist(), want_caps.tolist()))  # every pair once
    assert seen[:64] != sorted(seen[:64])  # shuffled, not in store order
    tracemalloc.start()  # epoch 1, after the first one warmed up lazy imports and zarr's caches
    n = sum(len(video["resnet152"]) for _, video in data.train_batches(1, 5, 32, 0.0, sampling))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == len(want_items)
    assert peak < budget, (peak, budget, features)  # buffer, reads and one batch; the features are 4x budget


def torch_equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_float16_checks_on_the_bits_equal_numpy_for_every_value() -> None:
    from store.schema import bad_value_rows
    from train.data import _zero_invalid

    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(-1, 1, 1)  # all 65536 float16 values
    np.testing.assert_array_equal(bad_value_rows(every), ~np.isfinite(every.ravel()))
    np.testing.assert_array_equal(bad_value_rows(every, nan_only=True), np.isnan(every.ravel()))
    rng = np.random.default_rng(0)
    for dtype, full in ((np.float16, 0.1), (np.float16, 0.9), (np.float32, 0.1), (np.float32, 0.9)):
        v = rng.standard_normal((40, 5, 3)).astype(dtype)
        v[rng.random(v.shape) < 0.05] = np.nan  # NaN at masked steps must be cleared too
        mask = rng.random((40, 5)) < 0.7
        mask[:int(40 * full)] = True  # `full` of the rows have every step valid
        want = v.copy()
        np.copyto(want, 0, where=~mask[:, :, None])
        _zero_invalid(v, mask)
        np.testing.assert_array_equal(v.view(np.uint8), want.view(np.uint8))  # bit-exact, +0.0


def test_streamed_reads_keep_float16_in_the_buffer_and_check_values(tmp_path: Path) -> None:
    import zarr

    from train.data import DataError, StoreData

    store = _pairs_store(tmp_path / "p.zarr", n=256)
    data = StoreData(store, _needs(), cache_bytes=2**16)
    assert data.stream is not None
    items, caps = data.epoch_pairs(0, 1, 0.0)
    cols = data.stream._read(np.argsort(items)[:16], items, caps)
    assert cols["v/resnet152"].dtype == np.float16 and cols["t/clip_text"].dtype == np.float32  # as stored
    text, video = next(iter(data.train_batches(0, 1, 8, 0.0)))
    assert video["resnet152"].dtype == torch_float32() and text["clip_text"].dtype == torch_float32()
    values = zarr.open_array(f"{store.url}/resnet152/values", mode="r+")
    row = values[11:12]  # a train item
    row[0, 5, 0] = np.inf  # a step past the row's 3 valid steps: zeroed, not an error
    values[11:12] = row
    assert sum(len(v["resnet152"]) for _, v in StoreData(store, _needs(), cache_bytes=2**16).train_batches(
        0, 1, 8, 0.0)) == len(items)
    row[0, 1, 0] = np.inf  # a valid step
    values[11:12] = row
    with pytest.raises(DataError, match=r"'resnet152' holds NaN/inf values in 1 item row\(s\): ids 'v11'"):
        sum(1 for _ in StoreData(store, _needs(), cache_bytes=2**16).train_batches(0, 1, 8, 0.0))


def torch_float32():  # type: ignore[no-untyped-def]
    import torch

    return torch.float32


def test_buffer_pop_writes_the_incoming_rows_into_the_holes() -> None:
    from train.stream import _Buffer

    buf = _Buffer(10)
    buf.add({"x": np.arange(10), "y": np.arange(10) * 2.0})
    out = buf.pop(np.array([2, 7, 4, 9]), {"x": np.array([100, 101]), "y": np.array([200.0, 202.0])})
    np.testing.assert_array_equal(out["x"], [2, 7, 4, 9])
    assert buf.n == 8  # four out, two in
    x, y = buf.data["x"][:buf.n], buf.data["y"][:buf.n]
    assert sorted(x.tolist()) == [0, 1, 3, 5, 6, 8, 100, 101]  # every other row kept once, the incoming ones in
    np.testing.assert_array_equal(y, x * 2.0)  # rows stay whole across columns
    assert x[2] == 100 and x[7] == 101  # straight into the first holes: no append and move


def test_a_store_with_zstd_values_streams_the_cached_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr

    import store.zarr_store as zs
    from train.data import StoreData

    real = zs.feature_arrays

    def zstd_values(spec, rows, shard_rows=None):  # type: ignore[no-untyped-def]  # the codec of older stores
        out = real(spec, rows, shard_rows)
        out["values"]["compressors"] = [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]
        return out

    monkeypatch.setattr(zs, "feature_arrays", zstd_values)
    store = _pairs_store(tmp_path / "z.zarr", n=256)
    assert zarr.open_array(f"{store.url}/resnet152/values", mode="r").compressors[0].to_dict()["name"] == "zstd"
    cached = StoreData(store, _needs(), cache_bytes=2**30)
    data = StoreData(store, _needs(), cache_bytes=2**17)
    assert data.stream is not None
    n = 0
    for text, video in data.train_batches(0, 2, 16, 0.0):
        items, caps = data.stream.last
        n += len(items)
        want = cached.video_batch(items)
        assert all(torch_equal(video[k], want[k]) for k in want)
        assert torch_equal(text["clip_text"], cached.text_batch(caps)["clip_text"])
    assert n == len(data.epoch_pairs(0, 2, 0.0)[0])


def test_pooled_features_stream_as_one_step_and_the_cached_tensors(tmp_path: Path) -> None:
    from train.data import StoreData
    from train.models._api import FeatureNeeds

    store = _pairs_store(tmp_path / "p.zarr", n=256)
    needs = FeatureNeeds(video=("resnet152", "vggish"), text="clip_text", text_key="clip_text", text_sequence=False,
                         pooled=(("resnet152", "max"), ("vggish", "mean")))
    cached, data = StoreData(store, needs, cache_bytes=2**30), StoreData(store, needs, cache_bytes=2**17)
    assert data.stream is not None
    # a pooled pair holds one step per feature: resnet152 512 float16 values + vggish 32 float32 means
    assert data.stream.pair_bytes() == 16 + (512 * 2 + 2) + (32 * 4 + 2) + 64 * 4
    n = 0
    for text, video in data.train_batches(0, 3, 16, 0.0):
        items, caps = data.stream.last
        n += len(items)
        want = cached.video_batch(items)
        assert video["resnet152"].shape[1] == 1 and all(torch_equal(video[k], want[k]) for k in want)
    assert n == len(data.epoch_pairs(0, 3, 0.0)[0])
