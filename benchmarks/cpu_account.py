"""Where the CPUs went during a benchmark window: CPU seconds per process role of this Ray session (Linux /proc).

A background thread samples, every `interval` seconds, the utime+stime of this process and all its descendants
(a local Ray session's gcs_server, raylet, its workers and agents), each process's role (its Ray title, e.g.
`ray::DecodeWorker`), and the machine's total busy CPU time (/proc/stat). `account(t0, t1)` gives CPU seconds per
role between two `time.perf_counter()` stamps (interpolated between samples), plus `other`: the machine's busy time
that no process of the session used (other users' load). Processes that ended keep their last sample.
"""
from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections import defaultdict

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of `pid`, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields after the command name (which may hold spaces)
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK


def _role(pid: int, me: int) -> str:
    """A short role name: driver, gcs_server, raylet, ray::<Actor>, or the program's name."""
    if pid == me:
        return "driver (this process)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(".")[0].split()[0]  # "ray::DecodeWorker.stream()" -> "ray::DecodeWorker"
    words = [a.decode(errors="replace") for a in args if a]
    for w in words:
        base = os.path.basename(w)
        if base in ("gcs_server", "raylet") or base.endswith((".py",)):
            return base
    return os.path.basename(first) or "?"


def _busy() -> float:
    """The machine's busy CPU seconds since boot (all CPUs: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / TICK


class CpuSampler:
    """Samples the session's processes in a thread; `account(t0, t1)` -> {role: CPU seconds}."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.me = float(interval), os.getpid()
        self.times: list[float] = []
        self.machine: list[float] = []
        self.cpu: dict[int, list[tuple[float, float]]] = defaultdict(list)  # pid -> [(t, cpu s)]
        self.roles: dict[int, str] = {}
        self.own = 0.0  # this sampler's own thread CPU seconds (it runs in the driver)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            c0 = time.thread_time()
            self._sample()
            self.own += time.thread_time() - c0
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        """One sample of every descendant of this process (the tree is walked from /proc each time)."""
        t = time.perf_counter()
        parents: dict[int, list[int]] = defaultdict(list)
        cpus: dict[int, float] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None:
                    parents[st[0]].append(int(name))
                    cpus[int(name)] = st[1]
        todo, seen = [self.me], set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in cpus:
                continue
            seen.add(pid)
            todo.extend(parents.get(pid, ()))
            self.cpu[pid].append((t, cpus[pid]))
            role = _role(pid, self.me)
            # an idle worker becomes an actor (keep the actor); an exiting process's cmdline reads empty ("?")
            if pid not in self.roles or role not in ("ray::IDLE", "?"):
                self.roles[pid] = role
        self.times.append(t)
        self.machine.append(_busy())

    def account(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role between perf_counter stamps t0 and t1, plus "other" (not this session)."""
        out: dict[str, float] = defaultdict(float)
        for pid, series in self.cpu.items():
            out[self.roles[pid]] += _at(series, t1) - _at(series, t0)
        session = sum(out.values())
        pairs = list(zip(self.times, self.machine))
        out["other (not this session)"] = max(0.0, _at(pairs, t1) - _at(pairs, t0) - session)
        return dict(out)


def _at(series: list[tuple[float, float]], t: float) -> float:
    """A cumulative counter's value at time t, linear between samples; 0 before a process's first sample."""
    if not series or t <= series[0][0]:
        return 0.0 if not series or t < series[0][0] else series[0][1]
    i = bisect_left(series, (t, float("-inf")))
    if i >= len(series):
        return series[-1][1]
    (ta, a), (tb, b) = series[i - 1], series[i]
    return a + (b - a) * (t - ta) / (tb - ta) if tb > ta else b
