"""extract._api: frame-step sessions (step frames, batching, gaps, images), caption extractors, seeded random
weights and the random_init="missing" fallback, provenance."""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from extract import (
    RandomWeightsWarning,
    WeightsError,
    WeightsNotFound,
    WeightsSpec,
    create_extractor,
    register_extractor,
    weights_available,
)
from extract._api import FRAME_BATCH
from extract._registry import _REGISTRY
from store.schema import Status
from tests._extractors import Batch, IndexEcho, batches
from tests._fakes import FakeWeightsFactory


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


@pytest.mark.parametrize("name", ["resnet152", "clip"])
def test_model_batch_defaults_by_device_and_keeps_an_explicit_size(name: str) -> None:
    """CPU batches default to FRAME_BATCH["cpu"] frames (cache-sized), accelerator ones to 32; a given size wins."""
    ex = create_extractor(name, random_init=True)
    assert ex.device.type == "cpu" and ex.batch_size == FRAME_BATCH["cpu"] < FRAME_BATCH["accelerator"]
    assert create_extractor(name, random_init=True, batch_size=5).batch_size == 5
    with pytest.raises(ValueError, match=f"{name}: batch_size must be > 0, got 0"):
        create_extractor(name, random_init=True, batch_size=0)
    ex.device = torch.device("cuda")  # the default follows the device the model runs on
    assert ex.model_batch(None) == FRAME_BATCH["accelerator"] and ex.model_batch(3) == 3


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


def test_random_if_missing_falls_back_loudly_to_the_seeded_random_weights(tmp_path: Path, no_weights_anywhere: Path,
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


def test_random_if_missing_uses_real_weights_when_they_resolve(tmp_path: Path, no_weights_anywhere: Path,
                                                               fake_weights: FakeWeightsFactory) -> None:
    src = torch.nn.Linear(1, 2)
    digest = fake_weights(src, "t.pth").sha256
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


def test_random_if_missing_never_hides_a_wrong_or_named_file(tmp_path: Path, no_weights_anywhere: Path) -> None:
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
