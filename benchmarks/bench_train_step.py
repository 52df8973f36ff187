"""Training time per optimizer step, tvr vs the reference-equivalent step (`_reference_steps.py`), same run.

Per model (MEE, X-Pool, T-MASS): each round runs the reference loop and tvr's `train_one_epoch` in fresh
subprocesses, one after the other (interleaved), and keeps per-step ms; the figures are medians over rounds.
Memory: peak PSS of the process plus its children (the reference's DataLoader worker), sampled every 20 ms until
the child prints its result (the interpreter's exit is left out: see `run_child`).
tvr trains on a synthetic store (real dims; word2vec-like 300-d words for MEE, as the reference) with the
features cached in memory; the reference reads its own in-memory numpy / tensor dataset through a DataLoader.
Run: `flock /tmp/tvr-bench.lock .venv/bin/python benchmarks/bench_train_step.py --model all`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("mee", "xpool", "tmass")
WORDS = "word2vec"  # 300-d word sequences added to the synthetic store (the reference's text input)
BATCH = {"mee": 128, "xpool": 32, "tmass": 32}  # reference defaults (MEE train.py; X-Pool / T-MASS configs)


def make_store(url: str, items: int, captions: int) -> None:
    """Synthetic store with real dims plus a 300-d, 30-step word-vector feature."""
    from store import synth
    from store.schema import FeatureRows, FeatureSpec, Status
    from store.zarr_store import FeatureStore

    synth.generate(url, items=items, captions_per_item=captions, missing={"dlib_face": 0.5, "vggish": 0.2}, seed=0)
    store = FeatureStore.open(url, "r+")
    spec = FeatureSpec(WORDS, 300, 30, dtype="float32", modality="words", axis="caption", chunk_rows=256)
    store.ensure_feature(spec, {"weights": {"synthetic": True, "random": True, "seed": 0}, "preset": "synthetic"})
    rng = np.random.default_rng(1)
    n = store.n_captions
    for s in range(0, n, 256):
        rows = []
        for _ in range(s, min(n, s + 256)):
            k = int(rng.integers(5, 31))
            rows.append(FeatureRows(Status.OK, rng.standard_normal((k, 300)).astype(np.float32), np.zeros(k, np.float32)))
        store.write_block(WORDS, s, rows)
    store.pack_ready(partial=True)


def cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the reference's DataLoader worker) so far."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for kid in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def tvr_child(model: str, url: str, rounds: int, batch: int) -> dict:
    """Per-step ms of tvr's train_one_epoch on the store (one warm-up epoch, then `rounds` timed epochs)."""
    import torch

    from store.zarr_store import FeatureStore
    from train.config import build_config
    from train.data import StoreData
    from train.engine import build_model, make_optimizer, train_one_epoch

    over: dict = {"batch_size": batch, "device": "cpu", "image_rate": 0.0}
    if model == "mee":
        over["model_config"] = {"text_feature": WORDS}
        over["drop_last"] = True
    else:
        over.update(caption_sampling="all_pairs", lr=3e-5, model_config={"support_weight": 0.8} if model == "tmass" else {})
    cfg = build_config(model, over)
    store = FeatureStore.open(url)
    # StoreData(store, url, model) before the store carried its url, StoreData(store, model) after: --before
    # may time such an older checkout
    pos = (store, url, model) if "url" in inspect.signature(StoreData).parameters else (store, model)
    data = StoreData(*pos, model_config=cfg.model_config, cache_bytes=cfg.cache_bytes)
    net = build_model(cfg, data)
    opt = make_optimizer(cfg, net)
    n = data.n_train_batches(cfg.batch_size, cfg.image_rate, cfg.caption_sampling, cfg.drop_last)
    total = n * (rounds + 1)
    dev = torch.device("cpu")
    train_one_epoch(net, data, opt, cfg, 0, dev, 0, total, progress=False)
    times, cpu = [], []
    for e in range(1, rounds + 1):
        t0, c0 = time.perf_counter(), cpu_seconds()
        train_one_epoch(net, data, opt, cfg, e, dev, e * n, total, progress=False)
        times.append((time.perf_counter() - t0) / n * 1e3)
        cpu.append((cpu_seconds() - c0) / n * 1e3)
    return {"ms": times, "cpu_ms": cpu, "steps": n}


def ref_child(model: str, n_videos: int, captions: int, steps: int, rounds: int, batch: int) -> dict:
    """Per-step ms of the reference-equivalent loop: `steps` warm-up steps, then `rounds` x `steps` timed."""
    import torch

    from benchmarks import _reference_steps as ref

    torch.manual_seed(0)
    if model == "mee":
        run = ref.mee_run(n_videos, captions, batch_size=batch)
    else:
        run = ref.clip_head_run(n_videos, captions, stochastic=model == "tmass", batch_size=batch,
                                total_steps=steps * (rounds + 1))

    def batches():
        while True:
            yield from run.loader

    it = batches()
    for _ in range(steps):
        run.step(next(it))
    times, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(steps):
            run.step(next(it))
        times.append((time.perf_counter() - t0) / steps * 1e3)
        cpu.append((cpu_seconds() - c0) / steps * 1e3)
    return {"ms": times, "cpu_ms": cpu, "steps": steps}


def _pss_kb(pid: int) -> int:
    """PSS of `pid` and all its descendants (kB), from /proc; 0 for processes gone meanwhile."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_child(args: list[str], root: Path = ROOT) -> dict:
    """Run this module (its copy under `root`) as a child; its JSON result plus its peak PSS (MB, children included).

    The peak is sampled until the child prints its result (unbuffered): a torch process's exit pages in another
    ~100-150 MB of shared-library code (C++ static destructors; `os._exit` skips it), which says nothing of
    training and, shared with other processes, varies from run to run. `exit_peak_mb` includes the exit.
    """
    script = root / "benchmarks" / Path(__file__).name
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, cwd=str(root),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak, exit_peak, done = [0], [0], threading.Event()

    def watch() -> None:
        while proc.poll() is None:
            kb = _pss_kb(proc.pid)
            exit_peak[0] = max(exit_peak[0], kb)
            if not done.is_set():
                peak[0] = max(peak[0], kb)
            time.sleep(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("{"):
            done.set()
    proc.wait()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"bench child {args} failed with exit code {proc.returncode}")
    res = json.loads("".join(lines).strip().splitlines()[-1])
    res["peak_mb"], res["exit_peak_mb"] = peak[0] / 1024, exit_peak[0] / 1024
    return res


def compare(model: str, url: str, n_videos: int, captions: int, rounds: int, inner: int, batch: int,
            before: Path | None = None) -> dict:
    """Interleaved rounds of reference and tvr children (and tvr at `before`); medians of ms/step, max peak PSS."""
    ms: dict[str, list[float]] = {"ref": [], "tvr": [], "before": []}
    cpu: dict[str, list[float]] = {"ref": [], "tvr": [], "before": []}
    mb: dict[str, list[float]] = {"ref": [], "tvr": [], "before": []}
    exit_mb: dict[str, list[float]] = {"ref": [], "tvr": [], "before": []}
    steps = 0
    tvr_args = ["--child", "tvr", "--model", model, "--store", url, "--inner", str(inner), "--batch", str(batch)]
    for _ in range(rounds):
        t = run_child(tvr_args)
        steps = t["steps"]
        runs = {"tvr": t, "ref": run_child(["--child", "ref", "--model", model, "--videos", str(n_videos),
                                             "--captions", str(captions), "--steps", str(steps), "--inner", str(inner),
                                             "--batch", str(batch)])}
        if before is not None:
            runs["before"] = run_child(tvr_args, before)
        for k, r in runs.items():
            ms[k] += r["ms"]
            cpu[k] += r.get("cpu_ms", [])  # an older copy of this benchmark (--before) may not report it
            mb[k].append(r["peak_mb"])
            exit_mb[k].append(r["exit_peak_mb"])
    out = {"model": model, "steps": steps}
    for k in ms:
        out[f"{k}_ms"] = statistics.median(ms[k]) if ms[k] else float("nan")
        out[f"{k}_cpu"] = statistics.median(cpu[k]) if cpu[k] else float("nan")
        out[f"{k}_peak_mb"] = max(mb[k]) if mb[k] else float("nan")
        out[f"{k}_exit_peak_mb"] = max(exit_mb[k]) if exit_mb[k] else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="all", choices=(*MODELS, "all"))
    p.add_argument("--items", type=int, default=700, help="synthetic videos (80%% train)")
    p.add_argument("--captions", type=int, default=5, help="captions per video")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (fresh processes each)")
    p.add_argument("--inner", type=int, default=2, help="timed epochs (tvr) / step blocks (reference) per round")
    p.add_argument("--store", help="reuse a store made by this benchmark")
    p.add_argument("--before", type=Path, help="a checkout of older tvr code (holding a copy of this benchmark) "
                   "timed in the same rounds, e.g. a `git worktree add` of the commit before a change")
    p.add_argument("--batch", default="", help="batch sizes, e.g. mee=64 (the MSR-VTT README's); default "
                   + ",".join(f"{k}={v}" for k, v in BATCH.items()) + " (the reference code defaults)")
    p.add_argument("--child", choices=("tvr", "ref"), help=argparse.SUPPRESS)
    p.add_argument("--videos", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    child_batch = int(args.batch) if args.batch.isdigit() else BATCH.get(args.model, 0)  # children get one model
    if args.child == "tvr":
        print(json.dumps(tvr_child(args.model, args.store, args.inner, child_batch)))
        return 0
    if args.child == "ref":
        print(json.dumps(ref_child(args.model, args.videos, args.captions, args.steps, args.inner, child_batch)))
        return 0
    batch = {**BATCH, **{k: int(v) for k, _, v in (x.partition("=") for x in args.batch.split(",") if x)}}
    import torch

    models = MODELS if args.model == "all" else (args.model,)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or str(Path(tmp) / "bench.zarr")
        if not args.store:
            t0 = time.perf_counter()
            make_store(url, args.items, args.captions)
            print(f"synthetic store: {args.items} videos x {args.captions} captions in {time.perf_counter() - t0:.1f} s")
        n_train = int(round(0.8 * args.items))
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
              f"{os.getloadavg()[0]:.2f}, {args.rounds} rounds x {args.inner} timed blocks, batch {batch}")
        print("ms: wall ms per optimizer step; cpu: CPU ms per step (process + DataLoader worker); x: reference / "
              "tvr; MB: peak PSS with children")
        print(f"{'model':<7}{'steps':>6}{'ref ms':>9}{'tvr ms':>9}{'x':>7}{'before':>9}{'x':>7}{'ref cpu':>9}"
              f"{'tvr cpu':>9}{'x':>7}{'before':>9}{'x':>7}{'ref MB':>8}{'tvr MB':>8}{'before':>8}")
        for m in models:
            r = compare(m, url, n_train, args.captions, args.rounds, args.inner, batch[m], args.before)
            print(f"{m:<7}{r['steps']:>6}{r['ref_ms']:>9.1f}{r['tvr_ms']:>9.1f}{r['ref_ms'] / r['tvr_ms']:>7.2f}"
                  f"{r['before_ms']:>9.1f}{r['ref_ms'] / r['before_ms']:>7.2f}{r['ref_cpu']:>9.1f}{r['tvr_cpu']:>9.1f}"
                  f"{r['ref_cpu'] / r['tvr_cpu']:>7.2f}{r['before_cpu']:>9.1f}{r['ref_cpu'] / r['before_cpu']:>7.2f}"
                  f"{r['ref_peak_mb']:>8.0f}{r['tvr_peak_mb']:>8.0f}{r['before_peak_mb']:>8.0f}", flush=True)
            print(f"{'':<7}peak PSS with the interpreter's exit: ref {r['ref_exit_peak_mb']:.0f} MB, tvr "
                  f"{r['tvr_exit_peak_mb']:.0f} MB, before {r['before_exit_peak_mb']:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
