"""The shared test fixtures (conftest.py, tests/_media.py, tests/_fakes.py) give exactly what they promise."""
from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from extract import resolve_weights
from store import FeatureSpec, Status
from tests._fakes import FakeWeightsFactory, TinyStoreFactory
from tests._media import (
    TinyVideoFactory,
    numbered_frames,
    shown_index,
    write_audio,
    write_image,
    write_numbered,
    write_video,
)


def decoded(path: Path) -> tuple[np.ndarray, list[Fraction]]:
    """Every video frame PyAV decodes (RGB) and its presentation time."""
    with av.open(str(path)) as c:
        frames = [(f.to_ndarray(format="rgb24"), f.time) for f in c.decode(video=0)]
    return np.stack([f for f, _ in frames]), [Fraction(t).limit_denominator(1000) for _, t in frames]


def decoded_audio(path: Path) -> np.ndarray:
    """Every audio sample as s16, (channels, n)."""
    with av.open(str(path)) as c:
        chunks = [f.to_ndarray() for f in c.decode(audio=0)]
        channels = c.streams.audio[0].channels
    packed = np.concatenate([ch.reshape(-1) for ch in chunks])  # packed s16: interleaved
    return packed.reshape(-1, channels).T


def test_tiny_video_decodes_to_exactly_its_frames(tiny_video: TinyVideoFactory) -> None:
    v = tiny_video(12, fps=25, size=(10, 14))
    frames, times = decoded(v.path)
    assert v.frames.shape == (12, 10, 14, 3) and v.frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, v.frames)  # lossless: equal, not close
    np.testing.assert_array_equal(shown_index(frames), np.arange(12))
    assert times == [Fraction(i, 25) for i in range(12)]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)  # odd sizes and noise: no chroma subsampling
    w = tiny_video(noise, fps=10, name="noise.mkv")
    np.testing.assert_array_equal(decoded(w.path)[0], noise)
    assert decoded(w.path)[1] == [Fraction(i, 10) for i in range(5)]


def test_tiny_video_audio_is_exact(tiny_video: TinyVideoFactory) -> None:
    t = np.arange(3000) / 16000
    v = tiny_video(4, audio=0.5 * np.sin(2 * np.pi * 440 * t))  # float mono: scaled by 32767, truncated
    assert v.audio is not None and v.audio.dtype == np.int16 and v.audio.shape == (1, 3000)
    np.testing.assert_array_equal(decoded_audio(v.path), v.audio)
    np.testing.assert_array_equal(v.audio[0], (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16))
    stereo = np.stack([np.arange(2500, dtype=np.int16), -np.arange(2500, dtype=np.int16)])
    s = tiny_video(3, audio=stereo, sample_rate=8000, name="stereo.mkv")
    np.testing.assert_array_equal(decoded_audio(s.path), stereo)
    with av.open(str(s.path)) as c:
        assert c.streams.audio[0].sample_rate == 8000 and c.streams.audio[0].channels == 2


def test_variable_frame_rate_and_audio_only_and_image_writers(tmp_path: Path) -> None:
    ms = [0, 40, 120, 1000]
    write_numbered(tmp_path / "vfr.mkv", [Fraction(t, 1000) for t in ms], time_base=Fraction(1, 1000))
    frames, times = decoded(tmp_path / "vfr.mkv")
    np.testing.assert_array_equal(frames, numbered_frames(4))
    assert times == [Fraction(t, 1000) for t in ms]
    pcm = (np.arange(5000) % 700 - 350).astype(np.int16)
    write_audio(tmp_path / "a.wav", pcm, 16000)
    np.testing.assert_array_equal(decoded_audio(tmp_path / "a.wav"), pcm[None])
    img = numbered_frames(1, (9, 7))[0]
    write_image(tmp_path / "i.png", img)
    np.testing.assert_array_equal(decoded(tmp_path / "i.png")[0][0], img)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "bad.mkv", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="time_base"):
        write_numbered(tmp_path / "bad.mkv", [0.0, 0.1])


def test_tiny_store_items_captions_and_rows(tiny_store: TinyStoreFactory) -> None:
    vid = FeatureSpec("resnet152", dim=3, max_steps=4)
    text = FeatureSpec("clip_text", dim=2, max_steps=1, dtype="float32", modality="text", axis="caption")
    s = tiny_store(5, features=[vid, text], captions=2, absent_every=3)
    assert s.n_items == 5 and list(s.items().id) == [f"v{i}" for i in range(5)]
    assert list(s.items().split) == ["train", "val", "test", "train", "val"]
    assert list(s.captions().id)[:3] == ["v0#0", "v0#1", "v1#0"] and len(s.captions().id) == 10
    st = [Status(int(x)) for x in s.status("resnet152")]
    assert st == [Status.OK, Status.OK, Status.ABSENT, Status.OK, Status.OK]
    b = s.read("resnet152")
    assert b.mask.sum(1).tolist() == [1, 2, 0, 4, 1]  # 1 + row % max_steps steps
    assert (s.status("clip_text") != int(Status.PENDING)).all()
    again = tiny_store(5, features=[vid, text], captions=2, absent_every=3, name="again.zarr")
    np.testing.assert_array_equal(again.read("resnet152").values, b.values)  # seeded
    empty = tiny_store(2, features=[vid], fill=False, name="empty.zarr")
    assert (empty.status("resnet152") == int(Status.PENDING)).all()


def test_fake_weights_pin_their_own_bytes(fake_weights: FakeWeightsFactory, tmp_path: Path) -> None:
    raw = fake_weights(b"abc")
    assert raw.path == tmp_path / "net.pth" and raw.path.read_bytes() == b"abc" == raw.data
    assert raw.sha256 == hashlib.sha256(b"abc").hexdigest() == raw.spec.sha256
    assert raw.spec.filename == "net.pth" and raw.identity == {"file": "net.pth", "sha256": raw.sha256}
    assert resolve_weights(raw.spec, weights_dir=tmp_path) == raw.path
    lin = torch.nn.Linear(2, 3)
    sd = fake_weights(lin, "lin.pth", directory=tmp_path / "w", preset="open_clip")
    assert sd.path.parent == tmp_path / "w" and sd.spec.preset == "open_clip"
    loaded = torch.load(sd.path, weights_only=True)
    assert torch.equal(loaded["weight"], lin.weight) and sd.sha256 == hashlib.sha256(sd.path.read_bytes()).hexdigest()
