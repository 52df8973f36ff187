"""Reaper for a local Ray that tvr started: if the driver dies (even by SIGKILL), kill every process it left behind.

Ray's own fate sharing takes its GCS, raylet and workers down with a killed driver, but the agents the raylet starts
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) are re-parented to init and keep running. The driver therefore
starts this small watcher in its own session (so a signal to the driver's process group does not reach it), naming
the processes `ray.init` started (the driver's new children). The watcher keeps a snapshot of those and their
descendants, refreshed every `POLL_S`; the driver holds the write end of a pipe to it, which the kernel closes
however the driver ends. On EOF it sends SIGTERM, then SIGKILL, to every process of the last snapshot that is still
the same process (pid and start time); nothing else the driver started is touched. Linux only (/proc); elsewhere
`start_reaper` returns None and nothing changes.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 3.0
PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of `pid`, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    return int(fields[1]), int(fields[19])


def _table() -> tuple[dict[int, list[int]], dict[int, int]]:
    """Every process: parent -> children, and pid -> start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[1]
    return children, starts


def children_of(pid: int) -> dict[int, int]:
    """pid -> start time of the living direct children of `pid` ({} off Linux)."""
    if not PROC.joinpath("self", "stat").exists():
        return {}
    children, starts = _table()
    return {c: starts[c] for c in children.get(pid, ()) if c in starts}


def family(roots: dict[int, int]) -> dict[int, int]:
    """pid -> start time of those `roots` that are still the same process, and all their living descendants."""
    children, starts = _table()
    out: dict[int, int] = {}
    todo = [r for r, start in roots.items() if starts.get(r) == start]
    while todo:
        pid = todo.pop()
        if pid not in out and pid in starts:
            out[pid] = starts[pid]
            todo.extend(children.get(pid, ()))
    return out


def _kill(procs: dict[int, int], sig: int) -> int:
    """Send `sig` to those of `procs` that are still the same process; how many were."""
    alive = 0
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, sig)
                alive += 1
            except OSError:
                pass
    return alive


def watch(roots: dict[int, int], fd: int) -> None:
    """Snapshot the `roots` family until `fd` reaches EOF, then kill what is left of the last snapshot."""
    snapshot = family(roots)
    while True:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready and not os.read(fd, 4096):
            break
        current = family(roots)
        # After a SIGKILL the raylet's agents are re-parented to init, so keep adding to what was seen.
        snapshot.update(current)
    if _kill(snapshot, signal.SIGTERM):
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and _kill(snapshot, 0):
            time.sleep(0.1)
        _kill(snapshot, signal.SIGKILL)


_HANDLE: subprocess.Popen[bytes] | None = None  # one local Ray per process, as ray.init itself allows


def start_reaper(before: dict[int, int]) -> None:
    """Watch the children this process gained since `before` (taken just ahead of `ray.init`); no-op off Linux."""
    global _HANDLE
    if not PROC.joinpath("self", "stat").exists():
        return
    stop_reaper()
    roots = {pid: start for pid, start in children_of(os.getpid()).items() if before.get(pid) != start}
    args = [f"{pid}:{start}" for pid, start in roots.items()]
    _HANDLE = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, start_new_session=True,
                               close_fds=True)


def stop_reaper() -> None:
    """After a clean `ray.shutdown()`: close the pipe, so the watcher kills any straggler and exits."""
    global _HANDLE
    if _HANDLE is not None and _HANDLE.stdin is not None:
        _HANDLE.stdin.close()
        try:
            _HANDLE.wait(timeout=GRACE_S + 5)
        except subprocess.TimeoutExpired:  # it finishes on its own; a finished run must not fail here
            pass
    _HANDLE = None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver, which then shuts Ray down itself
    watch({int(p): int(s) for p, s in (a.split(":") for a in sys.argv[1:])}, sys.stdin.fileno())
