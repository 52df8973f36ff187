"""`tvr-train eval` as a command: same metrics as scoring directly, no numba unless T-MASS scores, passive OpenMP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from store import synth
from tests._train_eval import direct_metrics

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter at the repository root, without OMP_WAIT_POLICY unless `env` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**base, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def tmass_run(tmp_path_factory):
    """A T-MASS run (config.yaml + best.pt, perturbed random weights) on a tiny synthetic store."""
    from store.zarr_store import FeatureStore
    from train.config import build_config, save_yaml
    from train.data import StoreData
    from train.engine import BEST, CONFIG_FILE, STORE_ID, _save, build_model

    root = tmp_path_factory.mktemp("evalspeed")
    url = str(root / "tiny.zarr")
    synth.generate(url, items=60, captions_per_item=2, missing={}, seed=3, small=True)
    store = FeatureStore.open(url)
    cfg = build_config("tmass", {"device": "cpu"})
    model = build_model(cfg, StoreData(store, "tmass"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the identity init, so every layer matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    run = root / "run"
    run.mkdir()
    save_yaml(cfg, run / CONFIG_FILE, {"store": url, STORE_ID: store.store_id})
    _save({"model": model.state_dict(), "epoch": 1, "val_score": 0.0}, run / BEST)
    return run, url


def test_the_command_gives_the_metrics_of_direct_scoring_to_the_last_digit(tmass_run, tmp_path):
    run, url = tmass_run
    out = tmp_path / "m.json"
    res = subprocess.run([sys.executable, "-m", "train.cli", "eval", str(run), "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    want = direct_metrics(run, url, "test", [0])[0]  # eval_seed 0
    assert {d: got[d] for d in ("t2v", "v2t")} == want  # exact: no tolerance
    assert got["n_videos"] == 6 and got["n_queries"] == 12


def test_numba_is_imported_only_when_the_t_mass_kernel_runs():
    res = _python("import sys, torch; import train.models, train.engine, train.cli, train.data\n"
                  "assert 'numba' not in sys.modules, 'numba imported with the models'\n"
                  "from train.models import tmass_noise\n"
                  "z = torch.zeros(3)\n"
                  "tmass_noise.trial_max(torch.zeros(3, dtype=torch.int64), *(torch.ones(3, 4),) * 3, z, z + 1, z + 1,"
                  " 2, 'uniform01', 1.0)\n"
                  "print('numba' in sys.modules, tmass_noise.kernel_name())")
    assert res.returncode == 0, res.stderr
    loaded, name = res.stdout.split(maxsplit=1)
    assert loaded == str(name.startswith("numba"))  # loaded exactly when it is the kernel in use


def test_eval_makes_openmp_waits_passive_before_torch_loads():
    code = ("import os, sys; from train.cli import passive_openmp_waits as p\n"
            "assert not p(['tmass', '--store', 'x']) and 'OMP_WAIT_POLICY' not in os.environ\n"
            "assert p(['eval', 'RUN']) and os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'\n"
            "import torch\n"
            "del os.environ['OMP_WAIT_POLICY']\n"
            "assert not p(['eval', 'RUN'])  # torch is loaded: too late, nothing set\n")
    res = _python(code)
    assert res.returncode == 0, res.stderr
    user = _python("import os; from train.cli import passive_openmp_waits as p\n"
                   "assert not p(['eval', 'RUN']) and os.environ['OMP_WAIT_POLICY'] == 'ACTIVE'",
                   env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert user.returncode == 0, user.stderr  # the user's own setting wins
