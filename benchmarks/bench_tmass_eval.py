"""T-MASS full evaluation (20 trials): wall time and peak memory on N texts x N videos x 12 frames x 512-d.

Each measurement runs in a fresh subprocess (`--child`) so its peak RSS (`resource.getrusage(...).ru_maxrss`, which
counts torch's allocations, unlike tracemalloc) is its own; memory is reported as that peak minus the RSS just
before the measured call (inputs and model built, imports done). Measured, in one run:
  * tvr: `TMASS.similarity` on the whole N x N (20 trials, noise drawn per (text, video, trial), chunked, no
    pairs x trials x D tensor; the fused numba kernel when numba is installed, else the torch one, as printed);
  * baseline (naive): the reference-style per-pair computation, i.e. for each video pool(v|t) for all texts through
    the D x D maps (`XPoolHead.forward`), R and all 20 trial vectors materialised, cosines, max over trials; run on
    `--naive-videos` videos and extrapolated linearly to N (its cost is linear in the number of videos); its scores
    on that subset are compared with tvr's (max abs difference);
  * baseline (X-Pool): `XPoolModel.similarity` on the whole N x N (same pooling, no trials).
Weights are the identity init plus seeded noise (so no layer is trivially the identity); features are seeded
Gaussians. Torch threads default to 2 (the target is "<= 10 s and < 1 GB on 2 CPU cores"). The machine may be
shared: each timing is the best of `--repeats`, and the 1-minute load average is printed.
Run: `flock /tmp/tvr-bench.lock .venv/bin/python benchmarks/bench_tmass_eval.py [--n 1000] [--threads 2]`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM, FRAMES, TRIALS = 512, 12, 20


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(n_texts: int, n_videos: int, model_name: str):
    """(model, text_emb, video_emb) with perturbed identity-init weights and seeded features."""
    import torch

    from train.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, feature_dims={"clip": DIM, "clip_text": DIM}, num_frames=FRAMES,
                         **({"trials": TRIALS} if model_name == "tmass" else {})).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    text = torch.randn(n_texts, DIM, generator=g)
    frames = torch.randn(n_videos, FRAMES, DIM, generator=g)
    return model, model.encode_text({"clip_text": text}), model.encode_video({"clip": frames})


def naive_similarity(model, text_emb, video_emb, seed: int = 0):
    """Reference-style leak-free T-MASS scores: per video, pool through the D x D maps and all trials materialised."""
    import torch
    import torch.nn.functional as F

    t, frames, keep = text_emb["t"], video_emb["frames"], video_emb["frames_mask"]
    out = t.new_empty(t.shape[0], frames.shape[0])
    with torch.no_grad():
        for a in range(frames.shape[0]):
            eps = model.eval_noise(torch.arange(t.shape[0]), torch.tensor([a]), seed)[:, 0]  # (Nt, K, D), as tvr's
            pooled = model.pool(t, frames[a : a + 1], keep[a : a + 1])[0]  # (Nt, D) = pool(a | t)
            r = model.radius(model.frame_cosines(t, frames[a : a + 1], keep[a : a + 1])[0])  # (Nt, D)
            samples = t[:, None, :] + eps * r[:, None, :]  # (Nt, K, D)
            out[:, a] = F.cosine_similarity(samples, pooled[:, None, :], dim=-1).amax(dim=1)
    return out


def child(kind: str, n: int, naive_videos: int, threads: int, repeats: int) -> dict:
    """One measurement in this (fresh) process; returns seconds and memory figures."""
    import torch

    torch.set_num_threads(threads)
    try:  # the fused kernel's threads (numba's own pool)
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    n_videos = naive_videos if kind == "naive" else n
    model, te, ve = _setup(n, n_videos, "xpool" if kind == "xpool" else "tmass")
    fn = (lambda a, b: naive_similarity(model, a, b)) if kind == "naive" else model.similarity
    before = _rss_mb()
    best, sim = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        sim = fn(te, ve)
        best = min(best, time.perf_counter() - t0)
    out = {"kind": kind, "seconds": best, "videos": n_videos, "texts": n, "rss_before_mb": before,
           "peak_mb": _peak_mb(), "shape": list(sim.shape)}
    if kind == "tmass":  # scores of the naive subset, for the agreement check
        out["subset"] = sim[:, :naive_videos].tolist()
    if kind == "naive":
        out["subset"] = sim.tolist()
    return out


def _run_child(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(args.n), "--naive-videos", str(args.naive_videos),
           "--threads", str(args.threads), "--repeats", str(args.repeats if kind != "naive" else 1)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"child {kind} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="texts = videos = N")
    p.add_argument("--naive-videos", type=int, default=20, help="videos the naive baseline is run on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=("tmass", "naive", "xpool"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(args.child, args.n, args.naive_videos, args.threads, args.repeats)))
        return 0
    import torch

    from train.models import tmass_noise

    print(f"T-MASS evaluation, {args.n} texts x {args.n} videos x {FRAMES} frames x {DIM}-d, {TRIALS} trials, "
          f"{args.threads} torch threads, load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs), trial kernel: "
          f"{tmass_noise.kernel_name()}")
    res = {k: _run_child(k, args) for k in ("tmass", "naive", "xpool")}
    diff = (torch.tensor(res["tmass"]["subset"]) - torch.tensor(res["naive"]["subset"])).abs().max().item()
    naive_full = res["naive"]["seconds"] * args.n / res["naive"]["videos"]
    print(f"{'method':<44}{'wall s':>9}{'peak RSS MiB':>14}{'+ over start':>14}")
    rows = [
        ("tvr TMASS.similarity (full)", res["tmass"]["seconds"], res["tmass"]),
        (f"naive per-pair, {args.naive_videos} videos -> x{args.n / args.naive_videos:g}", naive_full, res["naive"]),
        ("X-Pool similarity (full, no trials)", res["xpool"]["seconds"], res["xpool"]),
    ]
    for label, sec, r in rows:
        print(f"{label:<44}{sec:>9.2f}{r['peak_mb']:>14.0f}{r['peak_mb'] - r['rss_before_mb']:>14.0f}")
    tm = res["tmass"]
    inc = tm["peak_mb"] - tm["rss_before_mb"]
    print(f"speed-up over naive: x{naive_full / tm['seconds']:.1f}; T-MASS / X-Pool time: "
          f"x{tm['seconds'] / res['xpool']['seconds']:.1f}; max |tvr - naive| on the subset: {diff:.2e}")
    ok = tm["seconds"] <= 10.0 and inc < 1024
    print(f"target <= 10 s and < 1 GiB extra: {'met' if ok else 'NOT met'} ({tm['seconds']:.2f} s, +{inc:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
