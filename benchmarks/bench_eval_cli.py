"""`tvr-train eval` end to end vs its similarity kernel, on N test videos x N captions of a synthetic store.

Per model (T-MASS, X-Pool, MEE; random perturbed weights, CLIP-dim features from `store.synth`), in one run:
  * kernel: `model.similarity` on the encoded test split, in a fresh process, warm (best of 2 calls after a first
    one); the first call (numba's kernel load included) is shown as "cold";
  * stages of the same evaluation in that process: imports, store open, feature reads (StoreData), model and
    checkpoint, encoding, cold kernel, metrics;
  * in-process: `train.cli.main(["eval", RUN, ...])` in a process that has imported `train.cli` (1st call, 2nd call);
  * command: `tvr-train eval RUN` as a subprocess (interpreter start to exit: what a user sees), best of --repeats;
  * before (with --before DIR, a checkout of older code): the same command run from DIR, interleaved;
and the ratio command / kernel. Every way of evaluating must give the same metrics (checked, to the last digit).
The kernel and the stages run under the OpenMP wait policy the command sets for itself (train.cli).
Run: `flock /tmp/tvr-bench.lock .venv/bin/python benchmarks/bench_eval_cli.py [--n 1000] [--repeats 3]
[--workdir DIR] [--before DIR]`; prints the load average (the machine may be shared: timings are best-of).
Measured (2 CPUs, load average ~9 from other jobs, best of 2, --before = the code before numba was lazy and the
OpenMP waits passive): T-MASS kernel 5.24 s, command 10.28 s (x1.96 of the kernel; before 25.44 s), in-process
9.18 s / 5.88 s; X-Pool kernel 1.83 s, command 5.67 s (before 15.29 s); MEE kernel 0.16 s, command 9.05 s (before
19.11 s; its time is feature reads and encoding); every way gave identical metrics.
Measured after the console entry's fast exit (train.cli.console; 2 CPUs, load average 2.6 -> 1.5, under the bench
lock, best of 3, --before = the commit before it): X-Pool kernel 0.92 s, command 2.76 s = x3.01 of the kernel
(before 3.36 s = x3.65); T-MASS kernel 3.14 s, command 5.65 s = x1.80 (before 6.73 s = x2.14); identical metrics.
What X-Pool's command adds to its kernel is nearly all `import torch` (stages: imports 1.37 s, store open, reads,
model, encoding and metrics 0.15 s together), so x2 is out of reach for a kernel under ~1.4 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tmass", "xpool", "mee")


def setup(work: Path, n: int, models: list[str]) -> Path:
    """Synthetic store (N test videos, 1 caption each) and one run per model with perturbed random weights."""
    import torch

    from store.synth import generate
    from store.zarr_store import FeatureStore
    from train.config import build_config, save_yaml
    from train.data import StoreData
    from train.engine import BEST, CONFIG_FILE, _save, build_model

    url = work / f"synth{n}.zarr"
    if not url.exists():
        generate(url, items=n, captions_per_item=1, missing={}, splits=(0.0, 0.0, 1.0))
    store = FeatureStore.open(str(url))
    for name in models:
        run = work / f"run_{name}"
        if (run / BEST).is_file():
            continue
        cfg = build_config(name, {"device": "cpu"})
        model = build_model(cfg, StoreData(store, name, model_config=cfg.model_config, splits=("test",)))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # identity-initialised layers would otherwise hide work
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        run.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run / CONFIG_FILE, {"store": str(url), "store_id": store.store_id})
        _save({"model": model.state_dict(), "epoch": 1, "val_score": 0.0}, run / BEST)
    return url


def stages(run: Path) -> dict:
    """The evaluation's stages in this fresh process, timed; the kernel warm (best of 2) and its metrics."""
    t0 = time.perf_counter()
    from train.cli import passive_openmp_waits

    passive_openmp_waits(["eval"])  # the policy the command sets for itself
    import torch

    from train.config import config_from_run_yaml
    from train.data import StoreData
    from train.engine import BEST, CONFIG_FILE, _score, build_model, encode_for, load_checkpoint, load_weights
    from train.metrics import retrieval_metrics
    from store.zarr_store import FeatureStore

    out: dict[str, float] = {}
    last = [t0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        out[name], last[0] = now - last[0], now

    mark("imports")
    cfg, extra = config_from_run_yaml(run / CONFIG_FILE)
    store = FeatureStore.open(extra["store"])
    mark("store open")
    data = StoreData(store, cfg.model, model_config=cfg.model_config, cache_bytes=cfg.cache_bytes, splits=("test",))
    mark("feature reads")
    model = build_model(cfg, data)
    load_weights(model, load_checkpoint(run / BEST), run / BEST)
    es = data.eval_set("test")
    keys = data.eval_keys(es)
    mark("model + ids")
    t, v = encode_for(model, data, es.captions, es.items, cfg, torch.device("cpu"))
    mark("encode")
    seed = int(getattr(getattr(model, "config", None), "eval_seed", 0))
    sim = _score(model, t, v, cfg, keys, seed)
    mark("kernel (cold)")
    metrics = retrieval_metrics(sim, torch.from_numpy(es.query_item))
    mark("metrics")
    warm = []
    for _ in range(2):
        s0 = time.perf_counter()
        _score(model, t, v, cfg, keys, seed)
        warm.append(time.perf_counter() - s0)
    return {"stages": out, "kernel": min(warm), "metrics": metrics}


def in_process(run: Path, out: Path) -> dict:
    """main(["eval", ...]) twice in one process (imports of train.cli done, as a notebook or a test would)."""
    from train.cli import main

    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        if main(["eval", str(run), "--json", str(out)]) != 0:
            raise SystemExit(f"in-process eval of {run} failed")
        times.append(time.perf_counter() - t0)
    return {"first": times[0], "second": times[1], "metrics": _metrics(out)}


def _metrics(path: Path) -> dict:
    m = json.loads(path.read_text())
    return {"t2v": m["t2v"], "v2t": m["v2t"]}


def _child(kind: str, run: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--run", str(run), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"child {kind} {run} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def command(run: Path, out: Path, code: Path) -> float:
    """Wall seconds of `tvr-train eval RUN` (python -m train.cli from the checkout `code`)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "train.cli", "eval", str(run), "--json", str(out)],
                         capture_output=True, text=True, cwd=code, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"tvr-train eval {run} (code {code}) failed:\n{res.stderr[-3000:]}")
    return wall


def measure(name: str, work: Path, args: argparse.Namespace) -> dict:
    """Interleaved rounds of every measurement of one model; best of each."""
    run, out = work / f"run_{name}", work / f"metrics_{name}"
    best: dict[str, float] = {}
    res: dict = {}
    for _ in range(args.repeats):
        now = {"command": command(run, out.with_suffix(".cmd.json"), ROOT)}
        res["command_metrics"] = _metrics(out.with_suffix(".cmd.json"))
        if args.before:
            now["before"] = command(run, out.with_suffix(".before.json"), Path(args.before))
            res["before_metrics"] = _metrics(out.with_suffix(".before.json"))
        st = _child("stages", run, out.with_suffix(".st.json"))
        ip = _child("inproc", run, out.with_suffix(".ip.json"))
        now.update(kernel=st["kernel"], inproc_first=ip["first"], inproc_second=ip["second"],
                   cold=st["stages"]["kernel (cold)"])
        for k, v in now.items():
            best[k] = min(best.get(k, float("inf")), v)
        res["stages"] = {k: min(v, res.get("stages", {}).get(k, float("inf"))) for k, v in st["stages"].items()}
        res["stage_metrics"], res["inproc_metrics"] = st["metrics"], ip["metrics"]
    res["best"] = best
    return res


def report(name: str, r: dict) -> bool:
    """Print one model's rows; True when every way of evaluating gave the same metrics."""
    b = r["best"]
    same = r["command_metrics"] == r["stage_metrics"] == r["inproc_metrics"] == r.get("before_metrics", r["command_metrics"])
    print(f"{name:<6} kernel {b['kernel']:7.2f}  cold {b['cold']:7.2f}  in-process {b['inproc_first']:7.2f} / "
          f"{b['inproc_second']:6.2f}  command {b['command']:7.2f}"
          + (f"  before {b['before']:7.2f} (x{b['before'] / b['command']:.2f})" if "before" in b else "")
          + f"  command/kernel x{b['command'] / b['kernel']:.2f}  metrics identical: {same}")
    print("       stages (best of rounds): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
    return same


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 when the ways of evaluating disagree."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="test videos = captions")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--workdir", help="keep the store and runs here (reused when present)")
    p.add_argument("--before", metavar="DIR", help="checkout of older code to time the same command from")
    p.add_argument("--child", choices=("stages", "inproc"), help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        fn = stages if args.child == "stages" else (lambda r: in_process(r, Path(args.out)))
        print(json.dumps(fn(Path(args.run))))
        return 0
    models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="bench_eval_cli_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup(work, args.n, models)
        print(f"tvr-train eval, {args.n} texts x {args.n} videos (synthetic, CLIP-dim), best of {args.repeats}; "
              f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
        ok = all([report(m, measure(m, work, args)) for m in models])
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
