"""Extraction framework: step policies, frame-step sessions, registry behaviour, device choice, provenance."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from extract import (
    FrameStepExtractor,
    RandomWeightsWarning,
    StepPolicy,
    WeightsError,
    WeightsNotFound,
    WeightsSpec,
    create_extractor,
    list_extractors,
    weights_available,
)
from extract._device import pick_device, use_half
from extract._registry import UnknownExtractorError, _REGISTRY, register_extractor
from extract.sampling import frame_indices, frame_times, uniform_times
from store.schema import FeatureSpec, Status


@dataclass
class Batch:
    """Duck-typed extract.decode.FrameBatch."""

    frames: np.ndarray
    times: np.ndarray
    index: np.ndarray


def batches(n_frames: int, size: int = 7, hw: tuple[int, int] = (4, 6)) -> list[Batch]:
    """25 fps frames whose every pixel equals the frame index (mod 256), in batches of `size`."""
    out = []
    for s in range(0, n_frames, size):
        idx = np.arange(s, min(s + size, n_frames), dtype=np.int64)
        frames = np.broadcast_to((idx % 256).astype(np.uint8)[:, None, None, None], (len(idx), *hw, 3)).copy()
        out.append(Batch(frames, idx / 25.0, idx))
    return out


ECHO_WEIGHTS = WeightsSpec("t", "t.pth", "", "https://example.org/t.pth", "imagenet_v1")  # unpinned


class IndexEcho(FrameStepExtractor):
    """Test extractor: the feature of a frame is its pixel value (= its index), via a real batched 'model'."""

    name = "index_echo"

    def __init__(self, *, fps: float | None = 1.0, count: int | None = None, max_steps: int = 64,
                 batch_size: int = 3, weights: WeightsSpec = ECHO_WEIGHTS, **common: Any) -> None:
        super().__init__(**common)
        self.policy = StepPolicy(fps=fps, max_steps=max_steps, count=count)
        self.batch_size = batch_size
        self.spec = FeatureSpec(name="index_echo", dim=2, max_steps=self.policy.steps, dtype="float32")
        self.calls: list[int] = []
        self.model = self.build_model(lambda: torch.nn.Linear(1, 2), weights)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames[:, 0, 0, :1].astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return torch.cat([x, x], dim=1)


def test_rate_policy_times() -> None:
    p = StepPolicy(fps=1.0, max_steps=64)
    np.testing.assert_allclose(p.times(3.0), [0, 1, 2])
    np.testing.assert_allclose(p.times(3.04), [0, 1, 2, 3])
    np.testing.assert_allclose(p.times(0.3), [0])
    np.testing.assert_allclose(StepPolicy(fps=2.0).times(1.5), [0, 0.5, 1.0])
    capped = StepPolicy(fps=1.0, max_steps=4).times(100.0)  # beyond max_steps: spread over the whole item
    np.testing.assert_allclose(capped, [12.5, 37.5, 62.5, 87.5])
    assert StepPolicy(fps=1.0, max_steps=4).steps == 4


def test_count_policy_middle_of_segments_and_images() -> None:
    p = StepPolicy(count=4)
    np.testing.assert_allclose(p.times(2.0), [0.25, 0.75, 1.25, 1.75])
    assert p.steps == 4 and p.max_steps == 4
    np.testing.assert_allclose(uniform_times(1.0, 2), [0.25, 0.75])
    for pol in (p, StepPolicy(fps=1.0)):
        np.testing.assert_array_equal(pol.times(0.0), [0.0])  # images: one step at 0


@pytest.mark.parametrize("kw", [{}, {"fps": 1.0, "count": 3}, {"fps": 0.0}, {"count": 0}, {"fps": 1.0, "max_steps": 0}])
def test_bad_policies_raise(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="StepPolicy"):
        StepPolicy(**kw)
    with pytest.raises(ValueError, match="duration"):
        StepPolicy(fps=1.0).times(float("nan"))


def test_frame_index_mapping() -> None:
    t = np.array([0.0, 0.04, 0.039999999, 1.0, 0.5 / 25, 99.0])
    np.testing.assert_array_equal(frame_indices(t), [0, 1, 1, 25, 0, 2475])  # floor(t*25 + 1e-6)
    np.testing.assert_array_equal(frame_indices(t, n_frames=30), [0, 1, 1, 25, 0, 29])
    np.testing.assert_allclose(frame_times(np.array([0, 25, 13])), [0.0, 1.0, 0.52])
    assert frame_times(np.array([1])).dtype == np.float32


def test_session_picks_step_frames_and_batches() -> None:
    ex = IndexEcho(random_init=True, batch_size=2)
    info = SimpleNamespace(kind="video", duration=3.0)
    s = ex.start(info)
    for b in batches(75):
        s.add_frames(b)
    r = s.finish()
    assert r.status == Status.OK
    np.testing.assert_array_equal(r.values[:, 0], [0, 25, 50])  # frames k = 25 t
    np.testing.assert_allclose(r.times, [0.0, 1.0, 2.0])
    assert r.times.dtype == np.float32 and r.values.dtype == np.float32
    assert ex.calls == [2, 1]  # batched: a full batch during streaming, the rest at finish


def test_session_count_policy_clips_to_decoded_end() -> None:
    ex = IndexEcho(random_init=True, fps=None, count=4)
    s = ex.start(SimpleNamespace(kind="video", duration=4.0))  # steps at 0.5,1.5,2.5,3.5 s -> 12,37,62,87
    for b in batches(70):  # the stream is shorter than probed: 70 frames
        s.add_frames(b)
    r = s.finish()
    np.testing.assert_array_equal(r.values[:, 0], [12, 37, 62, 69])  # last step clipped to the last frame
    np.testing.assert_allclose(r.times, np.array([12, 37, 62, 69]) / 25, rtol=1e-6)


def test_session_repeats_frames_for_short_items() -> None:
    ex = IndexEcho(random_init=True, fps=None, count=6)
    s = ex.start(SimpleNamespace(kind="video", duration=0.12))  # 3 frames, 6 steps
    for b in batches(3):
        s.add_frames(b)
    r = s.finish()
    assert r.values.shape == (6, 2)
    np.testing.assert_array_equal(r.values[:, 0], [0, 0, 1, 1, 2, 2])


def test_session_image_and_no_frames() -> None:
    ex = IndexEcho(random_init=True)
    s = ex.start(SimpleNamespace(kind="image", duration=0.0))
    for b in batches(1):
        s.add_frames(b)
    r = s.finish()
    assert r.status == Status.OK and r.values.shape == (1, 2)
    np.testing.assert_array_equal(r.times, [0.0])
    empty = ex.start(SimpleNamespace(kind="video", duration=2.0)).finish()
    assert empty.status == Status.ABSENT and empty.reason == "no_video" and empty.values.shape == (0, 2)


def test_unknown_duration_is_a_clear_error() -> None:
    ex = IndexEcho(random_init=True)
    with pytest.raises(ValueError, match="no known duration"):
        ex.start(SimpleNamespace(kind="video", duration=float("nan"), path="x.mp4"))


def test_registry_duplicate_unknown_and_options() -> None:
    assert {"resnet152", "clip", "clip_text", "glove", "word2vec"} <= set(list_extractors())
    assert list_extractors() == sorted(list_extractors())
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("resnet152")(IndexEcho)
    with pytest.raises(UnknownExtractorError, match="no extractor named 'nope'.*resnet152"):
        create_extractor("nope")
    try:
        register_extractor("index_echo_tmp")(IndexEcho)
        ex = create_extractor("index_echo_tmp", random_init=True, seed=3)
        assert isinstance(ex, IndexEcho)
        with pytest.raises(TypeError, match="unknown options"):
            create_extractor("index_echo_tmp", random_init=True, bogus=1)
    finally:
        _REGISTRY.pop("index_echo_tmp", None)


def test_random_init_is_seeded_and_recorded() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = IndexEcho(random_init=True, seed=5), IndexEcho(random_init=True, seed=5)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    c = IndexEcho(random_init=True, seed=6)
    assert torch.equal(a.model.weight, b.model.weight) and not torch.equal(a.model.weight, c.model.weight)
    prov = a.provenance()
    assert prov["weights"] == {"random": True, "seed": 5}
    assert prov["preset"] == "imagenet_v1" and prov["tvr_version"] and prov["extractor"] == "index_echo"
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())


def test_device_choice() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert IndexEcho(random_init=True).device == pick_device("auto")  # extractors default to "auto"
    assert pick_device("cpu") == torch.device("cpu")
    assert not use_half(True, torch.device("cpu")) and use_half(True, torch.device("cuda"))
    with pytest.raises(ValueError, match="not a torch device"):
        pick_device("tpu-ish:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")


def test_caption_extractors_refuse_media() -> None:
    ex = create_extractor("glove")
    with pytest.raises(TypeError, match="caption feature"):
        ex.start(SimpleNamespace(kind="video", duration=1.0))
    with pytest.raises(TypeError, match="caption feature"):
        ex.extract_path("x.mp4")


def test_session_with_gaps_uses_the_next_decoded_frame() -> None:
    ex = IndexEcho(random_init=True)
    s = ex.start(SimpleNamespace(kind="video", duration=3.0))  # steps at frames 0, 25, 50
    for b in batches(75):
        keep = (b.index < 20) | (b.index > 27)  # frames 20..27 missing from the stream
        s.add_frames(Batch(b.frames[keep], b.times[keep], b.index[keep]))
    r = s.finish()
    np.testing.assert_array_equal(r.values[:, 0], [0, 28, 50])
    np.testing.assert_allclose(r.times, [0.0, 1.12, 2.0], rtol=1e-6)


@pytest.fixture
def no_env_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TVR_WEIGHTS_DIR from the caller's environment."""
    monkeypatch.delenv("TVR_WEIGHTS_DIR", raising=False)


def test_random_if_missing_falls_back_loudly_to_the_seeded_random_weights(tmp_path: Path, no_env_weights: None,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(RandomWeightsWarning, match="USING SEEDED RANDOM WEIGHTS.*seed 5.*t.pth.*example.org"):
        ex = IndexEcho(random_init="missing", seed=5, weights_dir=tmp_path)
    assert "USING SEEDED RANDOM WEIGHTS" in caplog.text  # also logged, for workers whose warnings are filtered
    ref = IndexEcho(random_init=True, seed=5)
    assert torch.equal(ex.model.weight, ref.model.weight) and torch.equal(ex.model.bias, ref.model.bias)
    assert ex.random_init is True and ex.random_reason == "weights not found: t.pth"
    assert ex.provenance()["weights"] == {"random": True, "seed": 5, "reason": "weights not found: t.pth"}
    s = ex.start(SimpleNamespace(kind="video", duration=2.0))
    for b in batches(50):
        s.add_frames(b)
    np.testing.assert_array_equal(s.finish().values[:, 0], [0, 25])  # and it runs like any extractor


def test_random_if_missing_uses_real_weights_when_they_resolve(tmp_path: Path, no_env_weights: None) -> None:
    src = torch.nn.Linear(1, 2)
    torch.save(src.state_dict(), tmp_path / "t.pth")
    digest = hashlib.sha256((tmp_path / "t.pth").read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # no fallback, so no warning
        ex = IndexEcho(random_init="missing", weights_dir=tmp_path)
    assert torch.equal(ex.model.weight, src.weight) and ex.random_init is False and ex.random_reason == ""
    assert ex.provenance()["weights"] == {"file": "t.pth", "sha256": digest}
    with pytest.warns(RandomWeightsWarning):  # the registry path goes through the same mechanism
        try:
            register_extractor("index_echo_missing")(IndexEcho)
            assert weights_available("index_echo_missing", weights_dir=tmp_path)
            assert not weights_available("index_echo_missing", weights_dir=tmp_path / "empty")
            made = create_extractor("index_echo_missing", random_init="missing", weights_dir=tmp_path / "empty")
        finally:
            _REGISTRY.pop("index_echo_missing", None)
    assert made.provenance()["weights"]["reason"] == "weights not found: t.pth"


def test_random_if_missing_never_hides_a_wrong_or_named_file(tmp_path: Path, no_env_weights: None) -> None:
    (tmp_path / "t.pth").write_bytes(b"not the pinned file")
    pinned = WeightsSpec("t", "t.pth", "ab" * 32, "https://example.org/t.pth", "imagenet_v1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        with pytest.raises(WeightsError, match="checksum mismatch") as e:
            IndexEcho(random_init="missing", weights=pinned, weights_dir=tmp_path)
        assert not isinstance(e.value, WeightsNotFound)
        with pytest.raises(WeightsError, match="does not exist"):
            IndexEcho(random_init="missing", weights_path=tmp_path / "typo.pth")
    with pytest.raises(ValueError, match="True, False or 'missing'"):
        IndexEcho(random_init="sometimes")
    with pytest.raises(WeightsNotFound, match="t.pth.*example.org"):
        IndexEcho(weights_dir=tmp_path / "empty")  # the default stays strict
