"""Decode throughput: `iter_frames(fps=25)` against plain PyAV decoding of every frame to RGB, in one run.

Generates 640x360 H.264 (yuv420p) test videos at 30 fps and 25 fps, then times, per video:
  * tvr: `extract.decode.iter_frames(path, fps=25)` (25 fps presentation-time resampling, RGB uint8 batches),
  * baseline: plain PyAV, `for f in container.decode(video=0): f.to_ndarray(format="rgb24")` with FFmpeg's
    frame+slice threading (`thread_type="AUTO"`, as tvr uses),
  * baseline+: the same loop converting through one shared `VideoReformatter` (PyAV's `to_ndarray(format=...)`
    builds a new swscale context for every frame; sharing one is the fastest plain loop we know),
  * the same three with a resize to height 300 (MEE's frame size), and the baseline with default threading.
Reports output frames/s (25 fps grid) and source frames/s (decoded), and the ratios tvr / baseline and
tvr / baseline+ in source frames/s. Each timing is the best of `--repeats` runs because the machine may be shared.

Memory: peak RSS of a fresh process streaming a `--memory-seconds` video and a 4x longer one through
`iter_frames(fps=25, batch_size=32)`, against the same process's RSS just before decoding (imports done, file
opened by nothing yet) and against what holding every output frame would take. Streaming is flat when the
long video's peak is about the short one's.
Run: `.venv/bin/python benchmarks/bench_decode.py [--seconds 10] [--repeats 3] [--memory-seconds 5]`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.decode import iter_frames, probe  # noqa: E402

WIDTH, HEIGHT = 640, 360


def make_video(path: Path, seconds: float, fps: int) -> int:
    """A 640x360 H.264 yuv420p video with moving texture (so frames are not trivially compressible)."""
    n = int(round(seconds * fps))
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (HEIGHT, WIDTH * 2, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        vs.options = {"preset": "veryfast", "crf": "23"}
        for i in range(n):
            shift = (4 * i) % WIDTH
            img = texture[:, shift:shift + WIDTH].copy()
            img[..., 0] = ((xx + 3 * i) % 256).astype(np.uint8)  # smooth moving gradient in red
            img[..., 1] //= 2
            img[..., 2] = ((yy + 2 * i) % 256).astype(np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    return n


def run_tvr(path: Path, height: int | None = None) -> int:
    """Output frames from iter_frames at 25 fps."""
    return sum(len(b) for b in iter_frames(path, fps=25.0, height=height))


def run_baseline(path: Path, threaded: bool = True, shared: bool = False, height: int | None = None) -> int:
    """Plain PyAV: decode every frame and convert it to an RGB ndarray (optionally resized to `height`)."""
    n = 0
    size: dict[str, int] = {}
    rf = VideoReformatter()
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        if threaded:
            vs.thread_type = "AUTO"
        if height is not None:
            size = {"width": round(vs.codec_context.width * height / vs.codec_context.height), "height": height,
                    "interpolation": "BILINEAR"}
        for f in c.decode(vs):
            if shared:
                rf.reformat(f, format="rgb24", **size).to_ndarray()
            else:
                f.to_ndarray(format="rgb24", **size)
            n += 1
    return n


def best_time(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Fastest wall time over `repeats` runs and the count the function returned."""
    best, count = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - t0)
    return best, count


_RSS_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from extract.decode import iter_frames
def vm(key):  # VmHWM is this process's own peak (ru_maxrss would include the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
before = vm("VmRSS")
n = sum(len(b) for b in iter_frames(sys.argv[2], fps=25.0, batch_size=32))
print(json.dumps({"frames": n, "before_kib": before, "peak_kib": vm("VmHWM")}))
"""


def peak_rss(path: Path) -> dict[str, int]:
    """Frames, RSS before decoding and peak RSS (KiB) of a fresh process streaming `path`."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(ROOT), str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_table(tmp: Path, seconds: float) -> None:
    """Peak RSS streaming a 30 fps video and a 4x longer one."""
    rows = []
    for mult in (1, 4):
        path = tmp / f"mem_{mult}x.mp4"
        make_video(path, seconds * mult, 30)
        rows.append((seconds * mult, peak_rss(path)))
    print(f"\nstreaming memory, {WIDTH}x{HEIGHT} H.264 30 fps -> 25 fps, batch_size=32, fresh process per video")
    print("video s | out frames | RSS before decode MiB | peak RSS MiB | peak - before MiB | all frames held MiB")
    for sec, r in rows:
        held = r["frames"] * WIDTH * HEIGHT * 3 / 2**20
        print(f"{sec:g} | {r['frames']} | {r['before_kib'] / 1024:.0f} | {r['peak_kib'] / 1024:.0f} | "
              f"{(r['peak_kib'] - r['before_kib']) / 1024:.0f} | {held:.0f}")
    (_, short), (_, long) = rows
    grow = (long["peak_kib"] - long["before_kib"]) / max(1, short["peak_kib"] - short["before_kib"])
    print(f"decode peak growth for 4x the length: {grow:.2f}x (1.00 = flat; holding frames would be ~4x)")


def main(argv: list[str] | None = None) -> int:
    """Generate, time and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each test video")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (best is reported)")
    ap.add_argument("--memory-seconds", type=float, default=5.0,
                    help="length of the short video of the memory check (the long one is 4x); 0 skips it")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src_fps in (30, 25):
            path = Path(tmp) / f"bench_{src_fps}fps.mp4"
            n_src = make_video(path, args.seconds, src_fps)
            expected_out = probe(path).n_output_frames(25.0)
            run_tvr(path)  # warm-up (page cache, library init)
            for height in (None, 300):
                t_tvr, n_out = best_time(lambda: run_tvr(path, height), args.repeats)
                t_base, n_base = best_time(lambda: run_baseline(path, height=height), args.repeats)
                t_plus, _ = best_time(lambda: run_baseline(path, shared=True, height=height), args.repeats)
                t_dflt = best_time(lambda: run_baseline(path, threaded=False), args.repeats)[0] if height is None else 0
                assert n_out == expected_out, (n_out, expected_out)
                assert n_base == n_src, (n_base, n_src)
                rows.append((f"{src_fps} fps" + (f", h={height}" if height else ""), n_src, n_out, t_tvr, t_base,
                             t_plus, t_dflt))
    print(f"decode throughput, {WIDTH}x{HEIGHT} H.264 yuv420p, {args.seconds:g} s videos, best of {args.repeats}")
    head = ("source", "src frames", "out frames", "tvr out f/s", "tvr src f/s", "baseline f/s", "baseline+ f/s",
            "baseline default-threads f/s", "tvr/baseline", "tvr/baseline+")
    print(" | ".join(head))
    for name, n_src, n_out, t_tvr, t_base, t_plus, t_dflt in rows:
        print(" | ".join([name, str(n_src), str(n_out), f"{n_out / t_tvr:.0f}", f"{n_src / t_tvr:.0f}",
                          f"{n_src / t_base:.0f}", f"{n_src / t_plus:.0f}", f"{n_src / t_dflt:.0f}" if t_dflt else "-",
                          f"{t_base / t_tvr:.2f}", f"{t_plus / t_tvr:.2f}"]))
    if args.memory_seconds > 0:
        with tempfile.TemporaryDirectory() as tmp:
            memory_table(Path(tmp), args.memory_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
