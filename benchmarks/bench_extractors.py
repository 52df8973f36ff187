"""Throughput of every registered extractor: whole extractor (session) vs bare model forward, random weights.

For each extractor and device (CPU, and CUDA when present) this prints units per second of
  - "session": the whole extractor on an already-decoded synthetic clip (decode EXCLUDED; preprocessing, step
    picking, batching, device transfer and dtype casting INCLUDED), or `encode_captions` for caption features;
  - "bare": the extractor's model forward alone on pre-made input tensors of the same batch size, in the same run,
    timed alternately with "session" (S, B, S, B, ...) so both see the same background load;
  - "ratio" = session / bare throughput (1.0 = no overhead outside the model; < 1: preprocessing etc. cost);
  - "dec+sess/s": `extract_path` on the same clip written losslessly (decode by extract.decode included), timed in
    the same alternation;
  - "clip s/s": seconds of clip per second of session (the real-time factor; 1 fps extractors touch few frames).
Units: model input (step) frames for frame-step extractors (ResNet, CLIP, faces), stacked frames for I3D, audio seconds
for VGGish, captions for caption features. Weights are seeded random ones (timing does not depend on their values).
Run: `flock /tmp/tvr-bench.lock .venv/bin/python benchmarks/bench_extractors.py [--seconds 2]` (~4 min, 2 CPU cores).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import create_extractor, list_extractors  # noqa: E402
from extract._api import CaptionExtractor, Extractor, FrameStepExtractor  # noqa: E402
from extract.word_vectors import WordVectors  # noqa: E402

FPS, SR, H, W = 25, 16000, 240, 320
# Cheaper settings for the slowest references on CPU (printed in the table's "options" column).
CPU_OPTIONS: dict[str, dict[str, Any]] = {
    "i3d_rgb": {"stack_size": 32, "step_size": 32},
    "i3d_flow": {"stack_size": 10, "step_size": 25, "raft": "raft_small.C_T_V2", "num_flow_updates": 2},
}
CAPTION = "a man in a red shirt is playing the guitar on a stage while people dance"


def media(seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """A seeded moving pattern with a real face (skimage's astronaut) sliding over it, uint8 (n, H, W, 3) at
    25 fps, and a 440 Hz tone at 16 kHz. The face makes dlib_face run its landmark + descriptor stages too."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 256, (H // 8 + 4, W // 8 + 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    face = np.asarray(Image.fromarray(data.astronaut()).resize((200, 200), Image.BILINEAR))
    n = int(seconds * FPS)
    frames = np.stack([np.roll(base, (k, 2 * k), axis=(0, 1))[:H, :W] for k in range(n)])
    for k in range(n):
        x = 20 + (k % 60)  # the face moves 1 px right per frame (wrapping every 60 frames)
        frames[k, 20:220, x : x + 200] = face
    t = np.arange(int(seconds * SR)) / SR
    return frames, (0.5 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)


def sync(dev: torch.device) -> None:
    """Wait for queued CUDA work so timings are real."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


REPEAT = 2  # every timing is the best of this many runs (--repeat): robust to other load on a shared machine


def once(fn: Callable[[], Any], dev: torch.device) -> float:
    """Wall seconds of one call (after and before a CUDA sync)."""
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def timed_alternating(first: Callable[[], Any], *later: Callable[[], Callable[[], Any] | None],
                      dev: torch.device) -> list[float | None]:
    """Best seconds of `first` and of the callables the `later` factories build (after one `first` call), run
    ALTERNATELY (first, second, third, first, ...) so all see the same background load on a shared machine."""
    times: list[list[float]] = [[once(first, dev)]]
    fns = [make() for make in later]
    times += [[] for _ in fns]
    for i in range(REPEAT):
        for fn, ts in zip(fns, times[1:]):
            if fn is not None:
                ts.append(once(fn, dev))
        if i < REPEAT - 1:
            times[0].append(once(first, dev))
    return [min(ts) if ts else None for ts in times]


def run_session(ex: Extractor, frames: np.ndarray, audio: np.ndarray) -> Any:
    """Feed frames (batches of 32) and audio (1 s chunks) through one session."""
    s = ex.start(SimpleNamespace(path="bench", kind="video", duration=len(frames) / FPS, has_audio=True,
                                 width=W, height=H, fps=float(FPS)))  # type: ignore[arg-type]
    if ex.needs_frames:
        for a in range(0, len(frames), 32):
            idx = np.arange(a, min(a + 32, len(frames)), dtype=np.int64)
            s.add_frames(SimpleNamespace(frames=frames[idx], times=idx / FPS, index=idx))  # type: ignore[arg-type]
    if ex.needs_audio:
        for a in range(0, len(audio), SR):
            s.add_audio(audio[a : a + SR])
    return s.finish()


def units_of(ex: Extractor, row: Any, audio_seconds: float) -> tuple[float, str]:
    """How many units a session processed, and their name."""
    if ex.needs_audio:
        return audio_seconds, "audio s"
    if hasattr(ex, "run_stacks"):
        return float(row.values.shape[0] * ex.stack_size), "stack frames"  # type: ignore[attr-defined]
    return float(row.values.shape[0]), "frames"


def bare(ex: Extractor, frames: np.ndarray, units: float, dev: torch.device) -> Callable[[], Any] | None:
    """A call running the model alone for `units` on pre-made tensors of the extractor's batch size (None: n/a)."""
    fn = _bare(ex, frames, units, dev)
    if fn is None:
        return None

    def go() -> Any:
        with torch.inference_mode():  # as the extractors' own forwards run
            return fn()

    return go


def _bare(ex: Extractor, frames: np.ndarray, units: float, dev: torch.device) -> Callable[[], Any] | None:
    """`bare` without the inference-mode wrapper (input tensors are made here, once)."""
    with torch.inference_mode():
        if isinstance(ex, FrameStepExtractor):
            b = max(1, min(ex.batch_size, int(units)))
            x = ex.preprocess(frames[:b])
            x = x.half() if ex.half else x
            ex.forward(x)  # warm-up
            return lambda: [ex.forward(x) for _ in range(math.ceil(units / b))]
        if hasattr(ex, "run_stacks"):  # I3D (+ RAFT for flow)
            c, t = ex.in_channels, ex.stack_size  # type: ignore[attr-defined]
            n_stacks = max(1, int(units) // t)
            x = [torch.randn(c, t, 224, 224, device=dev) for _ in range(ex.stack_batch)]  # type: ignore[attr-defined]
            flow = getattr(ex, "flow", None)
            # The session's RAFT batches: per stack, its new pairs (all t for the first, min(step, t) after) in
            # batches of pair_batch plus the remainder flushed when the stack is built; the same here.
            pb, step = ex.pair_batch, ex.step_size  # type: ignore[attr-defined]
            sizes: list[int] = []
            for new in [t] + [min(step, t)] * (n_stacks - 1):
                sizes += [pb] * (new // pb) + ([new % pb] if new % pb else [])
            pairs = {b: torch.rand(b, 3, 256, 341, device=dev) * 255 for b in set(sizes)}  # 240x320 frames, resized

            def go() -> None:
                for _ in range(math.ceil(n_stacks / len(x))):
                    ex.run_stacks(x)  # type: ignore[attr-defined]
                if flow is not None:
                    for b in sizes:
                        flow(pairs[b], pairs[b])

            return go
        if hasattr(ex, "pipeline"):  # dlib_face: detector + landmarks + descriptor per step frame
            n = max(1, int(units))
            ex.pipeline.faces(frames[0])  # type: ignore[attr-defined]
            return lambda: [ex.pipeline.faces(frames[i % len(frames)]) for i in range(n)]  # type: ignore[attr-defined]
        if hasattr(ex, "net") and ex.needs_audio:  # VGGish: 0.96 s log-mel examples
            n = max(1, round(units / 0.96))
            xb = torch.randn(min(ex.batch_size, n), 1, 96, 64, device=dev)  # type: ignore[attr-defined]
            xb = xb.half() if ex.half else xb
            ex.net(xb)
            return lambda: [ex.net(xb) for _ in range(math.ceil(n / len(xb)))]  # type: ignore[attr-defined]
    return None


def bare_captions(ex: CaptionExtractor, n: int, dev: torch.device) -> Callable[[], Any] | None:
    """A model-only call for `n` captions: encode_text on pre-made tokens, or a row gather for word vectors."""
    if isinstance(ex, WordVectors):
        m = ex.vectors.matrix
        ids = np.random.default_rng(0).integers(0, m.shape[0], (n, 15))
        def gather() -> None:
            for i in ids:
                np.asarray(m[i]).astype(ex.spec.dtype)

        gather()  # warm-up: the packaged matrix is memory-mapped, first touches fault pages in
        return gather
    if hasattr(ex, "tokenizer"):
        bs = ex.batch_size  # type: ignore[attr-defined]
        tok = ex.tokenizer([CAPTION] * min(bs, n)).to(dev)  # type: ignore[attr-defined]
        def go() -> None:
            with torch.inference_mode():
                for _ in range(math.ceil(n / len(tok))):
                    ex.model.encode_text(tok, normalize=False)  # type: ignore[attr-defined]

        go()  # warm-up
        return go
    return None


def write_clip(path: Path, frames: np.ndarray, audio: np.ndarray) -> None:
    """Lossless mkv (libx264rgb crf 0 + pcm_s16le 16 kHz) for the decode-included column."""
    import av

    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264rgb", rate=FPS, options={"crf": "0"})
        v.width, v.height, v.pix_fmt = W, H, "rgb24"
        a = c.add_stream("pcm_s16le", rate=SR, layout="mono")
        for f in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        af = av.AudioFrame.from_ndarray((audio * 32767).astype(np.int16)[None], format="s16", layout="mono")
        af.sample_rate = SR
        for p in list(a.encode(af)) + list(a.encode()):
            c.mux(p)


def bench_one(name: str, device: str, frames: np.ndarray, audio: np.ndarray, clip: Path | None,
              n_captions: int) -> dict[str, Any]:
    """One table row."""
    opts = dict(CPU_OPTIONS.get(name, {})) if device == "cpu" else {}
    if name == "word2vec":  # the GoogleNews file is not here: real GloVe vectors rewritten as word2vec binary
        opts["weights_path"] = str(word2vec_file())
    t0 = time.perf_counter()
    ex = create_extractor(name, random_init=True, device=device, **opts)
    build = time.perf_counter() - t0
    dev = ex.device if hasattr(ex, "device") else torch.device(device)
    row: dict[str, Any] = {"name": name, "device": device, "options": opts, "build_s": build}
    if isinstance(ex, CaptionExtractor):
        texts = [f"{CAPTION} {i}" for i in range(n_captions)]
        ex.encode_captions(texts[:8])  # warm-up
        s, b = timed_alternating(lambda: ex.encode_captions(texts), lambda: bare_captions(ex, n_captions, dev),
                                 dev=dev)
        assert s is not None
        row.update(unit="captions", units=n_captions, session=n_captions / s, bare=(n_captions / b) if b else None)
        return row
    run_session(ex, frames[:FPS], audio[:SR])  # warm-up (allocations, cudnn autotune)
    out: list[Any] = []

    def make_bare() -> Callable[[], Any] | None:
        units = units_of(ex, out[-1], len(audio) / SR)[0]
        return bare(ex, frames, units, dev) if units else None

    got: list[Any] = []
    decoded = (lambda: lambda: got.append(ex.extract_path(clip))) if clip is not None else (lambda: None)
    s, b, d = timed_alternating(lambda: out.append(run_session(ex, frames, audio)), make_bare, decoded, dev=dev)
    assert s is not None
    r = out[-1]
    units, unit = units_of(ex, r, len(audio) / SR)
    row.update(unit=unit, units=units, session=units / s, bare=(units / b) if b else None,
               status=r.status.name, realtime=(len(frames) / FPS) / s)
    if d is not None:  # units of its own row: the probed duration may differ from the synthetic one
        row["decode_session"] = units_of(ex, got[-1], len(audio) / SR)[0] / d
    return row


def word2vec_file(n_words: int = 50_000) -> Path:
    """The first `n_words` packaged GloVe 6B 50-d vectors written in word2vec binary format (a temp file)."""
    glove = create_extractor("glove")
    assert isinstance(glove, WordVectors)
    words = sorted(glove.vectors.index, key=glove.vectors.index.__getitem__)[:n_words]
    path = Path(tempfile.mkdtemp()) / "glove50k.bin"
    with open(path, "wb") as f:
        f.write(f"{len(words)} {glove.vectors.dim}\n".encode())
        for w in words:
            vec = np.asarray(glove.vectors.matrix[glove.vectors.index[w]], dtype="<f4")
            f.write(w.encode() + b" " + vec.tobytes() + b"\n")
    return path


def fmt(v: float | None) -> str:
    """Number cell."""
    return "n/a" if v is None else f"{v:9.2f}"


def main(argv: list[str] | None = None) -> int:
    """Benchmark every registered extractor (or --only NAME ...) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="synthetic clip length (s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--captions", type=int, default=64, help="captions for caption features")
    ap.add_argument("--only", nargs="*", default=None, help="extractor names (default: all registered)")
    ap.add_argument("--devices", nargs="*", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--repeat", type=int, default=REPEAT, help="timings are the best of this many runs")
    args = ap.parse_args(argv)
    globals()["REPEAT"] = max(1, args.repeat)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" for random_init
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    frames, audio = media(args.seconds)
    clip = None
    try:
        import extract.decode  # noqa: F401

        clip = Path(tempfile.mkdtemp()) / "bench.mkv"
        write_clip(clip, frames, audio)
    except ModuleNotFoundError:
        pass
    names = args.only or list_extractors()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clip {args.seconds:g} s {W}x{H} @ {FPS} fps; "
          f"random weights; session = decode excluded, preprocessing included; best of {REPEAT}")
    head = f"{'extractor':<10} {'dev':<4} {'unit':<12} {'n':>6} {'session/s':>9} {'bare/s':>9} {'ratio':>6} " \
           f"{'dec+sess/s':>10} {'clip s/s':>8} {'build s':>7}  options"
    print(head)
    print("-" * len(head))
    for dev in devices:
        for name in names:
            try:
                r = bench_one(name, dev, frames, audio, clip, args.captions)
            except Exception as e:  # noqa: BLE001 - one broken extractor must not hide the others' numbers
                print(f"{name:<10} {dev:<4} FAILED: {type(e).__name__}: {e}")
                continue
            ratio = f"{r['session'] / r['bare']:6.2f}" if r.get("bare") and r.get("session") else "   n/a"
            print(f"{name:<10} {dev:<4} {r['unit']:<12} {r['units']:>6g} {fmt(r['session'])} {fmt(r.get('bare'))} "
                  f"{ratio} {fmt(r.get('decode_session')):>10} {fmt(r.get('realtime')):>8} {r['build_s']:7.1f}  "
                  f"{r['options'] or ''} {r.get('status', '')}", flush=True)
    print("session/s, bare/s: units per second (unit column); ratio = session/bare; dec+sess/s: extract_path on the "
          "lossless file; clip s/s: clip seconds per session second; RANDOM weights (timing only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
