"""pipelines.reaper: after a SIGKILL of a driver that started a local Ray, none of Ray's processes keep running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import reaper

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the reaper reads /proc (Linux)")

DRIVER = """
import os, sys, time
from pipelines.config import ExtractConfig
from pipelines.run import connect_ray
import ray
assert connect_ray(ExtractConfig(source="d", store="s"))
@ray.remote
def pid():
    return os.getpid()
ray.get(pid.remote())
helper = __import__("subprocess").Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("HELPER", helper.pid, flush=True)
print("READY", flush=True)
time.sleep(300)
"""


def _tree(root: int) -> dict[int, str]:
    """pid -> command line of every descendant of `root`, read from /proc independently of the reaper."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in out:
                try:
                    out[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    out[child] = "?"
                frontier.append(child)
    return out


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_of_the_driver_leaves_no_ray_process_running() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert driver.stdout is not None
        helper = -1
        for line in driver.stdout:
            if line.startswith("HELPER"):
                helper = int(line.split()[1])
            if line.startswith("READY"):
                break
        time.sleep(2 * reaper.POLL_S + 0.5)  # the watcher's snapshot includes the raylet's agents by now
        tree = _tree(driver.pid)
        ray_procs = {p: c for p, c in tree.items() if "ray" in c and "reaper.py" not in c}
        names = " ".join(ray_procs.values())
        assert "raylet" in names and "ray::RuntimeEnvAgent" in names, tree  # the agents a SIGKILL used to orphan
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in ray_procs):
            time.sleep(0.5)
        left = {p: c for p, c in ray_procs.items() if _alive(p)}
        assert not left, f"still running 30 s after the driver's SIGKILL: {left}"
        assert _alive(helper), "the reaper must not kill what the driver started outside Ray"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in [helper] if "helper" in locals() and helper > 0 else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_family_follows_descendants_and_checks_start_times() -> None:
    sleeper = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        time.sleep(0.3)
        roots = reaper.children_of(os.getpid())
        assert sleeper.pid in roots
        fam = reaper.family({sleeper.pid: roots[sleeper.pid]})
        assert sleeper.pid in fam and len(fam) == 2  # the shell and its sleep
        assert reaper.family({sleeper.pid: roots[sleeper.pid] + 1}) == {}  # a reused pid is not ours
    finally:
        sleeper.kill()
        subprocess.run(["pkill", "-P", str(sleeper.pid)], check=False)
        sleeper.wait()
