"""Tests of train/engine.py pieces: optimiser groups, learning-rate schedules, device choice, checkpoints."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import build_config
from train.engine import RunError, load_checkpoint, lr_at, make_optimizer, resolve_device
from train.models import create_model


def test_optimizer_groups_keep_the_logit_scale_lr():
    cfg = build_config("tmass")
    model = create_model("tmass", feature_dims={"clip": 8, "clip_text": 8}, num_frames=4)
    opt = make_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.2]
    scale = next(g for g in opt.param_groups if any(p is model.logit_scale for p in g["params"]))
    assert scale["base_lr"] == 1e-6 and len(scale["params"]) == 1
    rest = next(g for g in opt.param_groups if g is not scale)
    assert rest["base_lr"] == cfg.lr
    mee = make_optimizer(build_config("mee"), create_model("mee", feature_dims={"resnet152": 4, "glove": 3},
                                                           text_clusters=2))
    assert isinstance(mee, torch.optim.Adam) and not isinstance(mee, torch.optim.AdamW)


@pytest.mark.parametrize("name", ["mee", "tmass"])
def test_optimizer_is_fused_and_steps_as_the_for_loop_optimizer(name):
    """make_optimizer's fused Adam / AdamW gives the for-loop optimiser's parameters (per-group lrs kept)."""
    cfg = build_config(name, {"lr": 1e-2})
    dims = {"resnet152": 6, "glove": 3} if name == "mee" else {"clip": 8, "clip_text": 8}
    kw = {"text_clusters": 2} if name == "mee" else {"num_frames": 4}
    torch.manual_seed(0)
    model = create_model(name, feature_dims=dims, **kw)
    twin = create_model(name, feature_dims=dims, **kw)
    twin.load_state_dict(model.state_dict())
    opt = make_optimizer(cfg, model)
    assert all(g["fused"] for g in opt.param_groups)
    name_of = {id(p): n for n, p in model.named_parameters()}
    twin_params = dict(twin.named_parameters())
    groups = [{**{k: v for k, v in grp.items() if k not in ("params", "fused")},
               "params": [twin_params[name_of[id(p)]] for p in grp["params"]]} for grp in opt.param_groups]
    plain = type(opt)(groups, foreach=False)  # the for-loop implementation, same per-group hyper-parameters
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        plain.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_cosine_schedule_with_warmup():
    cfg = build_config("tmass", {"lr": 1.0})  # warmup 0.1
    total = 100
    assert lr_at(cfg, 0, 0, total) == pytest.approx(0.1)  # linear warm-up over 10 steps
    assert lr_at(cfg, 0, 9, total) == pytest.approx(1.0)
    assert lr_at(cfg, 0, 10, total) == pytest.approx(1.0)
    assert lr_at(cfg, 2, 55, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 4, 100, total) == pytest.approx(0.0, abs=1e-12)


def test_exponential_schedule():
    cfg = build_config("mee", {"lr": 1.0})
    assert [lr_at(cfg, e, 123, 1000) for e in range(3)] == pytest.approx([1.0, 0.95, 0.95**2])


def test_device_and_checkpoint_errors(tmp_path):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="--device cpu"):
            resolve_device("cuda")
    with pytest.raises(RunError, match="does not exist"):
        load_checkpoint(tmp_path / "last.pt")


_FAULTS_PER_STEP = """
import resource, sys
import torch
from train.engine import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
torch.set_num_threads(1)
lin = torch.nn.Linear(4096, 4096)  # a 64 MB weight (over glibc's 32 MB mmap cap): its gradient is re-made each step
opt = torch.optim.Adam(lin.parameters())
x = torch.randn(64, 4096)
def step():
    lin(x).square().mean().backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(4):  # warm-up: Adam state, the heap's high-water mark
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_stops_per_step_page_faults():
    """Freed gradient blocks are reused, not re-mapped and re-faulted each step (a fresh process each way)."""
    root = Path(__file__).resolve().parents[1]
    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, mode], cwd=root, capture_output=True, text=True,
                             check=True).stdout
        faults[mode] = float(out.split()[-1])
    assert faults["default"] > 8000  # the 64 MB gradient is 16384 pages
    assert faults["tuned"] < 0.25 * faults["default"], faults
