"""A small sample dataset for the demo: synthetic videos with and without audio, a moving real face, still images,
captions for every item and one corrupt file, described by a JSONL manifest."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np

FPS = 25
CORRUPT_ID = "broken"  # the one sample item that is not a video (FAILED decode_error by design)
SAMPLE_RATE = 16000


def _write_video(path: Path, frames: np.ndarray, audio: np.ndarray | None = None) -> None:
    """H.264 (yuv420p, crf 18) video at 25 fps, optionally with AAC mono audio at 16 kHz."""
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt, vs.options = w, h, "yuv420p", {"crf": "18"}
        a = None
        if audio is not None:
            a = c.add_stream("aac", rate=SAMPLE_RATE)
            a.layout = "mono"
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if a is not None:
            pcm = np.asarray(audio, dtype=np.float32)
            for start in range(0, len(pcm), 1024):
                fr = av.AudioFrame.from_ndarray(pcm[None, start:start + 1024], format="fltp", layout="mono")
                fr.sample_rate, fr.pts = SAMPLE_RATE, start
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)


def _gradient_frames(n: int, h: int, w: int, speed: int, seed: int) -> np.ndarray:
    """Moving colour gradients with a drifting square: cheap, non-trivial motion."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        out[t, ..., 0] = (xx * 2 + speed * t + base[0]) % 256
        out[t, ..., 1] = (yy * 2 + base[1]) % 256
        out[t, ..., 2] = (xx + yy + base[2] - speed * t) % 256
        x0 = (10 + speed * t) % (w - 24)
        out[t, 20:44, x0:x0 + 24] = 255
    return out


def _face_frames(n: int, size: int = 256) -> np.ndarray:
    """skimage's astronaut photo (a real face), panning a few pixels per frame."""
    from skimage import data, transform

    img = data.astronaut()  # (512, 512, 3) uint8; the face is in the upper middle
    frames = []
    for t in range(n):
        dx = int(round(6 * np.sin(2 * np.pi * t / n)))
        crop = img[10:330, 90 + dx:410 + dx]
        frames.append((transform.resize(crop, (size, size), anti_aliasing=True) * 255).astype(np.uint8))
    return np.stack(frames)


def make_sample_dataset(root: str | Path) -> Path:
    """Write the sample media and `manifest.jsonl` under `root`; returns the manifest path."""
    root = Path(root)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(3.0 * SAMPLE_RATE)) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)
    _write_video(media / "gradient_sound.mp4", _gradient_frames(75, 144, 192, 3, 0), audio=tone)
    _write_video(media / "gradient_silent.mp4", _gradient_frames(50, 144, 192, 5, 1))
    _write_video(media / "astronaut_face.mp4", _face_frames(75), audio=tone[: 2 * SAMPLE_RATE])
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()[:256, 128:384]).save(media / "astronaut.png")
    Image.fromarray(data.coffee()).save(media / "coffee.jpg", quality=92)
    (media / "broken.mp4").write_text("this file is not a video; it is here to show a FAILED decode_error row\n")
    rows = [
        {"id": "gradient_sound", "path": "media/gradient_sound.mp4", "split": "train",
         "captions": ["colourful stripes slide to the right while a tone plays", "a white square moves across"]},
        {"id": "gradient_silent", "path": "media/gradient_silent.mp4", "split": "train",
         "captions": ["silent moving colour gradient"]},
        {"id": "astronaut_face", "path": "media/astronaut_face.mp4", "split": "val",
         "captions": ["an astronaut smiles at the camera", "a woman in a space suit in front of a flag"]},
        {"id": "astronaut_still", "path": "media/astronaut.png", "kind": "image", "split": "test",
         "captions": ["portrait photo of an astronaut"]},
        {"id": "coffee", "path": "media/coffee.jpg", "kind": "image", "split": "test",
         "captions": ["a cup of coffee on a saucer"]},
        {"id": CORRUPT_ID, "path": "media/broken.mp4", "split": "train", "captions": ["a corrupt file"]},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest
