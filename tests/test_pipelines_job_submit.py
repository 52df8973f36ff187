"""`ray job submit ... -- python -m pipelines.extract` against a real local head started (and stopped) here.

Also pins the Ray 2.60 token behaviour documented in docs/cluster.md: with token auth on the head, the job client
needs RAY_AUTH_MODE=token in its environment.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests._media import write_video
from tests._pipelines import proc_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_head(head: subprocess.Popen) -> None:
    """Stop exactly the head this test started: SIGTERM its group, then SIGKILL what is left of it, by pid.

    (`ray stop --force` would also kill every other Ray on the machine, e.g. a test session running beside this.)
    """
    table = proc_table()
    group = {p for p, (_, g) in table.items() if g == head.pid}
    mine = group | {p for p, (pp, _) in table.items() if pp in group}
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.time() + 20
    while time.time() < end and any(p in proc_table() for p in mine):
        time.sleep(0.5)
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    head.wait(timeout=30)


def test_ray_job_submit_fills_a_store(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for i in range(3):
        write_video(media / f"v{i}.mkv", np.full((5, 16, 16, 3), 30 * (i + 1), np.uint8))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"v{i}", "path": f"media/v{i}.mkv", "captions": [f"video {i}"]})
                                + "\n" for i in range(3)))
    store = tmp_path / "store.zarr"
    port, dash = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dash}"
    token = uuid.uuid4().hex
    # entrypoints inherit the head's PATH: `python` must be this environment's
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="tvrray", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            r = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, r.stderr[-2000:]
            time.sleep(2)
        no_mode = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        r = subprocess.run([RAY, "job", "list", "--address", address], env=no_mode, capture_output=True, text=True)
        assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr  # the documented trap

        cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
               "python", "-m", "pipelines.extract", str(manifest), "--store", str(store),
               "--features", "test_mean,test_caption", "--plugins",
               os.environ.get("TVR_TEST_PLUGINS", "tests.pipelines_testext"), "--no-progress"]
        agent_deadline = time.time() + 180  # a loaded machine may take minutes to start the head's job agent
        while True:  # the head answers `job list` before its job agent registers; Ray says to retry then
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            out = r.stdout + r.stderr
            if r.returncode == 0 or "No available agent to submit job" not in out or time.time() > agent_deadline:
                break
            time.sleep(2)
        assert r.returncode == 0, out[-4000:]
        assert "succeeded" in out and "test_mean" in out
        job_id = next(w.strip("'") for w in out.split() if w.strip("'").startswith("raysubmit_"))
        logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                              text=True, timeout=60)
        assert "exit code 0" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]
    finally:
        _stop_head(head)

    from store.zarr_store import FeatureStore

    fs = FeatureStore.open(str(store))
    assert fs.coverage()["test_mean"] == {"ok": 3, "absent": 0, "failed": 0, "pending": 0}
    assert fs.coverage()["test_caption"]["ok"] == 3
    np.testing.assert_allclose(fs.read("test_mean").values[:, 0, 0], [30 / 255, 60 / 255, 90 / 255], atol=1e-6)
