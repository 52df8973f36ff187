"""The worker without Ray: one decode per item feeds every extractor, decode overlaps compute, failures stay local."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from extract._api import FrameStepExtractor, StepPolicy
from pipelines.worker import ExtractWorker
from store.schema import FeatureSpec, Status
from tests._media import break_video_stream, write_audio, write_image, write_video
from tests._pipelines import worker_store

PLUGIN = "tests.pipelines_testext"
FEATURES = ["test_mean", "test_max", "test_rms"]


def _worker(features: list[str] = FEATURES, **kw: Any) -> ExtractWorker:
    return ExtractWorker(features, plugins=[PLUGIN], extractor_kwargs={"random_init": True, "seed": 0}, **kw)


def _plain(obj: Any) -> bool:
    """Only small plain values (no arrays) in a summary sent back to the driver."""
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return isinstance(obj, (int, float, str, bool, type(None)))


def _counting(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> dict[str, int]:
    """Count (and optionally slow down) every call into the decoder's frame and audio iterators."""
    from extract import decode

    calls = {"frames": 0, "audio": 0}
    real_frames, real_audio = decode.iter_frames, decode.iter_audio

    def slowed(it: Iterator[Any]) -> Iterator[Any]:
        for b in it:
            time.sleep(delay)
            yield b

    def frames(*a: Any, **k: Any) -> Iterator[Any]:
        calls["frames"] += 1  # counted at the call, not at the first batch (the call comes before any thread waits)
        return slowed(real_frames(*a, **k))

    def audio(*a: Any, **k: Any) -> Iterator[Any]:
        calls["audio"] += 1
        yield from real_audio(*a, **k)

    monkeypatch.setattr(decode, "iter_frames", frames)
    monkeypatch.setattr(decode, "iter_audio", audio)
    return calls


def test_each_item_is_decoded_once_for_every_extractor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (10, 8, 12, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mkv", frames, audio=np.sin(np.arange(8000) * 0.05) * 0.5)
    w = _worker(batch_size=4)
    url = worker_store(tmp_path, w, {"a": tmp_path / "a.mkv"})
    calls = _counting(monkeypatch)
    summary = w.process(url, 0, str(tmp_path / "a.mkv"), FEATURES)
    assert calls == {"frames": 1, "audio": 1}  # three extractors, one decode of each stream
    assert summary["results"] == {f: (int(Status.OK), "") for f in FEATURES}
    assert _plain(summary)  # statuses and timings only; the arrays went to the store
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    flat = frames.reshape(10, -1, 3).astype(np.float64)
    np.testing.assert_allclose(fs.read("test_mean").values[0, :10], flat.mean(1) / 255, atol=1e-6)
    np.testing.assert_allclose(fs.read("test_max").values[0, :10], flat.max(1) / 255, atol=1e-6)


def test_ready_opens_the_store_before_the_first_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from store.zarr_store import FeatureStore

    write_video(tmp_path / "a.mkv", np.zeros((4, 8, 8, 3), np.uint8))
    w = _worker(batch_size=4)
    url = worker_store(tmp_path, w, {"a": tmp_path / "a.mkv"})
    opened: list[str] = []
    real_open = FeatureStore.open

    def counted(*a: Any, **k: Any) -> Any:
        opened.append(str(a[0]))
        return real_open(*a, **k)

    monkeypatch.setattr(FeatureStore, "open", counted)
    assert w.ready(url) == os.getpid() and opened == [url]  # the driver's clock starts after this
    w.process(url, 0, str(tmp_path / "a.mkv"), FEATURES)
    assert opened == [url]  # the item reused it


def test_decode_thread_overlaps_model_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = np.random.default_rng(2).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mkv", frames)
    delay = 0.08  # per batch, in decode and in the model: sleeps, so the overlap shows even on a busy machine
    opts = {"test_mean": {"delay": delay}}
    took, values = {}, {}
    _counting(monkeypatch, delay=delay)
    for q in (0, 4):
        w = _worker(["test_mean"], batch_size=2, queue_size=q, extractor_options=opts)
        url = worker_store(tmp_path / f"q{q}", w, {"v": tmp_path / "v.mkv"})
        t0 = time.perf_counter()
        assert w.process(url, 0, str(tmp_path / "v.mkv"), ["test_mean"])["results"]["test_mean"][0] == Status.OK
        took[q] = time.perf_counter() - t0
        from store.zarr_store import FeatureStore

        values[q] = FeatureStore.open(url).read("test_mean").values
    # 8 batches: inline ~ 8 * (decode + model) = 1.28 s, overlapped ~ 8 * max(...) + one = 0.72 s
    assert took[4] < 0.8 * took[0], took
    np.testing.assert_array_equal(values[0], values[4])


def test_one_failing_extractor_or_file_leaves_everything_else(tmp_path: Path) -> None:
    frames = np.full((5, 8, 8, 3), 60, np.uint8)
    write_video(tmp_path / "boom.mkv", frames)
    write_image(tmp_path / "p.png", np.full((6, 6, 3), 9, np.uint8))
    (tmp_path / "bad.mp4").write_text("not a video\n")
    w = _worker()
    paths = {"boom": tmp_path / "boom.mkv", "bad": tmp_path / "bad.mp4", "p": tmp_path / "p.png"}
    url = worker_store(tmp_path, w, paths)
    res = {k: w.process(url, r, str(p), FEATURES)["results"] for r, (k, p) in enumerate(paths.items())}
    assert res["boom"]["test_mean"] == (int(Status.FAILED), "extractor_error")
    assert res["boom"]["test_max"] == (int(Status.OK), "")  # same item, other extractor: unaffected
    assert res["boom"]["test_rms"] == (int(Status.ABSENT), "no_audio")
    assert all(v == (int(Status.FAILED), "decode_error") for v in res["bad"].values())
    assert res["p"]["test_mean"] == (int(Status.OK), "") and res["p"]["test_rms"] == (int(Status.ABSENT), "no_audio")
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    assert "scripted test failure" in str(fs.messages("test_mean", [0])[0])
    assert [str(r) for r in fs.reasons("test_mean")] == ["extractor_error", "decode_error", ""]
    assert fs.status("test_max").tolist() == [Status.OK, Status.FAILED, Status.OK]


def test_next_item_is_prefetched_once_and_a_wrong_hint_is_dropped(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    clips = {k: rng.integers(0, 256, (6 + i, 8, 8, 3), dtype=np.uint8) for i, k in enumerate(("a", "b", "c"))}
    for k, f in clips.items():
        write_video(tmp_path / f"{k}.mkv", f)
    w = _worker(["test_mean", "test_max"], batch_size=2)
    paths = {k: tmp_path / f"{k}.mkv" for k in clips}
    url = worker_store(tmp_path, w, paths)
    calls = _counting(monkeypatch)
    feats = ["test_mean", "test_max"]
    def settled(n: int) -> int:
        """The call count once the prefetch thread has had time to start (it calls the decoder itself)."""
        end = time.time() + 10
        while calls["frames"] < n and time.time() < end:
            time.sleep(0.02)
        time.sleep(0.3)
        return calls["frames"]

    w.process(url, 0, str(paths["a"]), feats, prefetch=(str(paths["b"]), feats))
    assert settled(2) == 2  # a, and b started early
    w.process(url, 1, str(paths["b"]), feats, prefetch=(str(paths["a"]), feats))  # a hint that turns out wrong
    assert settled(3) == 3  # b reused its prefetched stream; the one new call is the (wrong) prefetch of a
    w.process(url, 2, str(paths["c"]), feats)
    assert calls["frames"] == 4  # the wrong prefetch (a) was dropped, c decoded fresh
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    assert fs.status("test_mean").tolist() == [Status.OK] * 3
    vals = fs.read("test_mean").values
    for r, (k, f) in enumerate(clips.items()):
        want = f.reshape(len(f), -1, 3).astype(np.float64).mean(1) / 255
        np.testing.assert_allclose(vals[r, : len(f)], want, atol=1e-6)  # every item got its own frames


def test_next_items_are_probed_and_opened_off_the_model_thread(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Probing a next item (opening its file) never holds up the thread that runs the models; it is probed once."""
    import threading

    from extract import engine

    rng = np.random.default_rng(4)
    paths = {k: tmp_path / f"{k}.mkv" for k in ("a", "b")}
    for k, p in paths.items():
        write_video(p, rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    w = _worker(["test_mean"], batch_size=2)
    url = worker_store(tmp_path, w, paths)
    probes: list[tuple[str, str]] = []  # (file name, thread name)
    real = engine.probe_failure

    def probe(path: str) -> Any:
        probes.append((Path(path).name, threading.current_thread().name))
        return real(path)

    monkeypatch.setattr(engine, "probe_failure", probe)
    main = threading.current_thread().name
    w.process(url, 0, str(paths["a"]), ["test_mean"], prefetch=(str(paths["b"]), ["test_mean"]))
    w.process(url, 1, str(paths["b"]), ["test_mean"])
    assert [n for n, _ in probes] == ["a.mkv", "b.mkv"]  # b's probe ahead served its own call too
    assert probes[0][1] == main and probes[1][1] != main  # a: its own call; b: opened ahead in another thread
    from store.zarr_store import FeatureStore

    assert FeatureStore.open(url).status("test_mean").tolist() == [Status.OK] * 2


def _rms_alone(tmp_path: Path, path: Path) -> np.ndarray:
    """test_rms values of `path` from a worker that runs only test_rms (the reference run)."""
    from store.zarr_store import FeatureStore

    w = _worker(["test_rms"])
    url = worker_store(tmp_path / "alone", w, {"x": path})
    assert w.process(url, 0, str(path), ["test_rms"])["results"]["test_rms"] == (int(Status.OK), "")
    return FeatureStore.open(url).read("test_rms").values[0]


@pytest.mark.parametrize("queue_size", [0, 4])
def test_audio_only_file_gives_audio_features_ok_beside_frame_features(tmp_path: Path, queue_size: int) -> None:
    audio = np.sin(np.arange(12000) * 0.03) * 0.5
    path = tmp_path / "speech.wav"
    write_audio(path, audio, 16000)
    from extract import decode

    assert not decode.probe(path).has_video and decode.probe(path).has_audio  # really audio-only
    w = _worker(["test_mean", "test_rms"], queue_size=queue_size)
    url = worker_store(tmp_path, w, {"a": path})
    res = w.process(url, 0, str(path), ["test_mean", "test_rms"])["results"]
    assert res == {"test_mean": (int(Status.ABSENT), "no_video"), "test_rms": (int(Status.OK), "")}
    from store.zarr_store import FeatureStore

    got = FeatureStore.open(url).read("test_rms").values[0]
    np.testing.assert_array_equal(got, _rms_alone(tmp_path, path))  # the same as running the audio feature alone
    assert got[0, 0] == pytest.approx(np.sqrt(np.mean(audio ** 2)), rel=1e-3)  # independent: RMS of what was written


@pytest.mark.parametrize("queue_size", [0, 4])
def test_corrupt_video_stream_fails_only_frame_features(tmp_path: Path, queue_size: int) -> None:
    rng = np.random.default_rng(5)
    audio = np.sin(np.arange(16000) * 0.02) * 0.4
    write_video(tmp_path / "good.mkv", rng.integers(0, 256, (25, 16, 16, 3), dtype=np.uint8), audio=audio)
    path = tmp_path / "broken.mkv"
    break_video_stream(tmp_path / "good.mkv", path)
    from extract import decode

    with pytest.raises(decode.DecodeError):  # the video stream really is unreadable ...
        list(decode.iter_frames(path))
    assert np.concatenate(list(decode.iter_audio(path))).size == audio.size  # ... and the audio intact
    w = _worker(["test_mean", "test_max", "test_rms"], queue_size=queue_size)
    url = worker_store(tmp_path, w, {"b": path})
    res = w.process(url, 0, str(path), ["test_mean", "test_max", "test_rms"])["results"]
    assert res["test_mean"][0] == res["test_max"][0] == int(Status.FAILED)
    assert res["test_mean"][1] in ("decode_error", "truncated")
    assert res["test_rms"] == (int(Status.OK), "")
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    np.testing.assert_array_equal(fs.read("test_rms").values[0], _rms_alone(tmp_path, path))
    assert fs.read("test_rms").values[0, 0, 0] == pytest.approx(np.sqrt(np.mean(audio ** 2)), rel=1e-3)


def test_frames_are_decoded_on_the_25_fps_grid_with_the_frame_rule(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from extract import decode

    write_video(tmp_path / "v.mkv", np.zeros((4, 8, 8, 3), np.uint8))
    seen: list[dict[str, Any]] = []
    real = decode.iter_frames

    def spy(*a: Any, **k: Any) -> Iterator[Any]:
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(decode, "iter_frames", spy)
    for rule in ("floor", "nearest"):
        w = _worker(["test_mean"], frame_rule=rule, decode_height=6, queue_size=0)
        url = worker_store(tmp_path / rule, w, {"v": tmp_path / "v.mkv"})
        assert w.process(url, 0, str(tmp_path / "v.mkv"), ["test_mean"])["results"]["test_mean"][0] == Status.OK
    assert [(k["fps"], k["frame_rule"], k["height"]) for k in seen] == [(25.0, "floor", 6), (25.0, "nearest", 6)]


class _Tagged(FrameStepExtractor):
    """A frame-step extractor whose feature is a frame's pixel value; records each model batch's values and fails
    any batch holding the value `poison` (a model error on one item's frames)."""

    name = "tagged"

    def __init__(self, *, batch_size: int = 8, poison: int = -1, **common: Any) -> None:
        super().__init__(**common)
        self.policy = StepPolicy(fps=5.0, max_steps=64)
        self.batch_size, self.poison = batch_size, poison
        self.spec = FeatureSpec(name="tagged", dim=2, max_steps=64, dtype="float32")
        self.batches: list[list[int]] = []
        self.weights_identity, self.preset, self.variant = {"random": True, "seed": 0}, "none", "test"

    def preprocess(self, frames: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(frames[:, 0, 0, :1].astype(np.float32))

    def forward(self, x: Any) -> Any:
        import torch

        values = [int(v) for v in x[:, 0].tolist()]
        self.batches.append(values)
        if self.poison in values:
            raise RuntimeError(f"scripted model failure on value {self.poison}")
        return torch.cat([x, 2 * x], dim=1)


def _tagged_worker(queue_size: int, poison: int = -1) -> tuple[ExtractWorker, _Tagged]:
    w = _worker(["test_mean"], queue_size=queue_size, batch_size=4)
    ex = _Tagged(random_init=True, poison=poison)
    w.extractors = {"tagged": ex}  # the worker holds whatever extractors it is given; this one is test-only
    return w, ex


def _item_of(value: int) -> int:
    """Which item a pixel value belongs to (item i's frame k shows 60 * i + k)."""
    return value // 60


@pytest.mark.parametrize("queue_size", [0, 4])
def test_items_in_flight_share_model_batches_and_match_per_item_extraction(tmp_path: Path, queue_size: int) -> None:
    paths = {}
    for i in range(4):  # 2 s at 5 steps/s: 10 step frames per item, 8 per model batch
        frames = np.broadcast_to((60 * i + np.arange(50)).astype(np.uint8)[:, None, None, None], (50, 8, 8, 3))
        paths[f"v{i}"] = write_video(tmp_path / f"v{i}.mkv", frames.copy())
    w, ex = _tagged_worker(queue_size)
    url = worker_store(tmp_path, w, paths)
    items = [(r, str(p), ["tagged"]) for r, p in enumerate(paths.values())]
    out = w.process_many(url, items)["items"]
    assert sorted(s["row"] for s in out) == [0, 1, 2, 3] and _plain(out)
    assert all(s["results"] == {"tagged": (int(Status.OK), "")} for s in out)
    mixed = [b for b in ex.batches if len({_item_of(v) for v in b}) >= 2]
    assert mixed or queue_size, ex.batches  # model batches held frames of several items (threads: usually)
    assert sorted(v for b in ex.batches for v in b) == sorted(60 * i + k for i in range(4) for k in range(0, 50, 5))
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    alone = _Tagged(random_init=True)
    for r, p in enumerate(paths.values()):
        want = alone.extract_path(p)  # the same extractor, one item at a time
        got = fs.read("tagged", [r])
        assert int(got.mask[0].sum()) == len(want.values)
        np.testing.assert_array_equal(got.values[0, : len(want.values)], want.values)
        np.testing.assert_array_equal(got.time[0, : len(want.times)], want.times)
    assert all(len({_item_of(v) for v in b}) == 1 for b in alone.batches)


@pytest.mark.parametrize("queue_size", [0, 4])
def test_a_failing_item_in_flight_fails_alone(tmp_path: Path, queue_size: int) -> None:
    paths = {}
    for i in range(3):
        frames = np.broadcast_to((60 * i + np.arange(50)).astype(np.uint8)[:, None, None, None], (50, 8, 8, 3))
        paths[f"v{i}"] = write_video(tmp_path / f"v{i}.mkv", frames.copy())
    break_video_stream(paths["v0"], tmp_path / "broken.mkv")
    (tmp_path / "bad.mp4").write_text("not a video\n")
    paths = {"broken": tmp_path / "broken.mkv", "bad": tmp_path / "bad.mp4", **paths}
    w, ex = _tagged_worker(queue_size, poison=60 + 15)  # item v1's step frame 15 breaks any batch holding it
    url = worker_store(tmp_path, w, paths)
    out = w.process_many(url, [(r, str(p), ["tagged"]) for r, p in enumerate(paths.values())])["items"]
    res = {list(paths)[s["row"]]: s["results"]["tagged"] for s in out}
    assert res["broken"][0] == res["bad"][0] == res["v1"][0] == int(Status.FAILED)
    assert res["broken"][1] in ("decode_error", "truncated") and res["bad"][1] == "decode_error"
    assert res["v1"][1] == "extractor_error"
    assert res["v0"] == res["v2"] == (int(Status.OK), "")  # their frames shared a failed batch: retried alone
    if queue_size == 0:  # round-robin reads: the failed batch was mixed (decode threads: it depends on timing)
        assert any(75 in b and len({_item_of(v) for v in b}) >= 2 for b in ex.batches), ex.batches
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    assert "scripted model failure" in str(fs.messages("tagged", [3])[0])
    for r, name in ((2, "v0"), (4, "v2")):
        want = _Tagged(random_init=True).extract_path(paths[name])
        np.testing.assert_array_equal(fs.read("tagged", [r]).values[0, : len(want.values)], want.values)


@pytest.mark.parametrize("queue_size", [0, 4])
def test_a_call_longer_than_in_flight_streams_k_items_at_a_time(tmp_path: Path, queue_size: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from extract import engine

    paths = {}
    for i in range(5):
        frames = np.broadcast_to((60 * (i % 4) + np.arange(50)).astype(np.uint8)[:, None, None, None], (50, 8, 8, 3))
        paths[f"v{i}"] = write_video(tmp_path / f"v{i}.mkv", frames.copy())
    w, ex = _tagged_worker(queue_size)
    url = worker_store(tmp_path, w, paths)
    open_now, most = [0], [0]
    real = engine.decode_streams

    def counted(*a: Any, **k: Any) -> Iterator[Any]:
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            yield from real(*a, **k)
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(engine, "decode_streams", counted)
    out = w.process_many(url, [(r, str(p), ["tagged"]) for r, p in enumerate(paths.values())], in_flight=2)["items"]
    assert sorted(s["row"] for s in out) == [0, 1, 2, 3, 4]
    assert all(s["results"] == {"tagged": (int(Status.OK), "")} for s in out)
    # 2 streaming (+ the call's next item's decode opened ahead, with decode threads), never all 5
    assert 2 <= most[0] <= (2 if queue_size == 0 else 3), most
    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(url)
    for r, p in enumerate(paths.values()):
        want = _Tagged(random_init=True).extract_path(p)
        np.testing.assert_array_equal(fs.read("tagged", [r]).values[0, : len(want.values)], want.values)
