"""CLIP fine-tuning on 2 processes (torchrun, gloo, CPU) equals one process with the same global batch: losses per
epoch and every weight of last.pt, within float tolerance; the gather's gradient is the single-process one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_CLIP, make_shapes_store

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TVR_OFFLINE="1")
    return env


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    store = make_shapes_store(tmp_path / "s.zarr", per_combo_train=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "clip_model": "tvr-tiny", "clip_model_cfg": TINY_CLIP, "num_frames": 4, "epochs": 2, "batch_size": 8,
        "lr": 1e-3, "clip_lr": 1e-3, "val_split": "", "prefetch": 0, "device": "cpu",
        "model_config": {"support_weight": 0.8}}))  # T-MASS with the support loss: noise and dropout must agree
    common = ["tmass", "--finetune-clip", "--store", store.url, "--config", str(cfg), "--random-init"]
    from train.cli import main

    assert main([*common, "--out", str(tmp_path / "one")]) == 0  # one process, in this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "train", *common, "--out", str(tmp_path / "two")], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    hist = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("one", "two")]
    assert [h["epoch"] for h in hist[1]] == [1, 2]
    for a, b in zip(*hist):
        for k in ("train_loss", "loss_s", "loss_sup"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])
    wa = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5, msg=k)
    first = torch.load(tmp_path / "one" / "best.pt", weights_only=True)["model"]  # no val split: best = last epoch
    assert all(torch.equal(wa[k], first[k]) for k in wa)
    conf = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())
    assert conf["world_size"] == 2 and conf["clip_weights"] == {"random": True, "seed": 24}
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert ma["t2v"]["MnR"] == pytest.approx(mb["t2v"]["MnR"]) and ma["n_queries"] == mb["n_queries"]


def _gather_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: loss over gathered rows; saves its input gradient."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from train import distributed as D

    info = D.init("cpu")
    x = (torch.arange(6, dtype=torch.float64).view(3, 2) + 10 * rank).requires_grad_(True)
    full = D.gather(x, info)
    (full.square().sum(1) * torch.arange(1, 7, dtype=torch.float64)).sum().backward()  # the same loss on both ranks
    torch.save({"full": full.detach(), "grad": x.grad}, f"{out}/r{rank}.pt")
    D.shutdown()


@pytest.mark.slow
def test_gather_keeps_gradients_of_the_global_loss(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    x = torch.cat([torch.arange(6, dtype=torch.float64).view(3, 2) + 10 * r for r in range(2)]).requires_grad_(True)
    w = torch.arange(1, 7, dtype=torch.float64)
    (x.square().sum(1) * w).sum().backward()  # each rank's loss is the full loss; DDP then averages the N copies
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt", weights_only=True)
        torch.testing.assert_close(got["full"], x.detach())
        torch.testing.assert_close(got["grad"] / 2, x.grad[3 * r : 3 * r + 3])  # summed over 2 ranks, then / 2
