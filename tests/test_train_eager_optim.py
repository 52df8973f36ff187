"""Tests of train/eager_optim.py: torch's Adam / AdamW updates, without importing torch._dynamo."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.eager_optim import EagerAdam, EagerAdamW

ROOT = Path(__file__).resolve().parents[1]


def _run(cls: type[torch.optim.Optimizer], steps: int = 4, **kw: object) -> tuple[list[torch.Tensor], dict]:
    """Parameters after `steps` updates of a small regression, and the optimiser's state_dict."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt = cls([{"params": net[0].parameters(), "lr": 1e-2}, {"params": net[2].parameters(), "lr": 3e-3}], **kw)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()], opt.state_dict()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("eager", "plain", "kw"), [(EagerAdam, torch.optim.Adam, {"weight_decay": 0.01}),
                                                    (EagerAdamW, torch.optim.AdamW, {"weight_decay": 0.2, "eps": 1e-6})])
def test_same_updates_and_state_as_torch(eager, plain, kw, fused):
    got, state = _run(eager, fused=fused, **kw)
    want, want_state = _run(plain, fused=fused, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert state["param_groups"] == want_state["param_groups"]
    for k, s in want_state["state"].items():
        assert all(torch.equal(state["state"][k][n], v) for n, v in s.items())
    torch.manual_seed(0)
    other = eager([torch.nn.Parameter(torch.zeros(6, 5))], **kw)  # a torch optimiser's state loads into it
    other.load_state_dict({"state": {}, "param_groups": [{**want_state["param_groups"][0], "params": [0]}]})


def test_training_steps_never_import_dynamo():
    """make_optimizer's optimiser is built, stepped and checkpointed without torch._dynamo (~95 MB of PSS)."""
    code = (
        "import sys, torch\n"
        "from train.config import build_config\n"
        "from train.engine import make_optimizer\n"
        "from train.models import create_model\n"
        "for name in ('xpool', 'mee'):\n"
        "    cfg = build_config(name, {})\n"
        "    dims = {'clip': 8, 'clip_text': 8} if name == 'xpool' else {'resnet152': 8, 'glove': 8}\n"
        "    m = create_model(name, feature_dims=dims, **cfg.model_config)\n"
        "    opt = make_optimizer(cfg, m)\n"
        "    sum(p.sum() for p in m.parameters()).backward()\n"
        "    opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False"
