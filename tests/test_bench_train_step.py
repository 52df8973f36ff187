"""benchmarks/bench_train_step.py: its reference-equivalent steps compute tvr's functions, and it runs and reports."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import _reference_steps as ref
from benchmarks import bench_train_step as bench
from train.losses import max_margin_ranking_loss, symmetric_cross_entropy
from train.models import create_model
from train.models.mee import GatedEmbeddingUnit
from train.models.netvlad import NetVLAD
from train.models.xpool import XPoolHead


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_reference_mee_pieces_equal_tvr_with_reference_padding():
    torch.manual_seed(0)
    x = torch.randn(6, 9, 12)
    x[:, 7:] = 0  # zero padding, unmasked in the reference (tvr: netvlad_mask_padding=False)
    r, t = ref.RefNetVLAD(4, 12), NetVLAD(12, 4, mask_padding=False)
    with torch.no_grad():
        t.assign.copy_(r.clusters)
        t.centres.copy_(r.clusters2)
    assert torch.allclose(r(x), t(x), atol=1e-6)
    rg, tg = ref.RefGEU(12, 8), GatedEmbeddingUnit(12, 8)
    tg.load_state_dict({"fc.weight": rg.fc.weight, "fc.bias": rg.fc.bias, "gate.weight": rg.cg.weight,
                        "gate.bias": rg.cg.bias, **{f"bn.{k}": v for k, v in rg.bn.state_dict().items()}})
    h = torch.randn(6, 12)
    assert torch.allclose(rg(h), tg(h), atol=1e-6)
    s = torch.randn(7, 7)
    assert torch.allclose(ref.ref_max_margin(s, 0.2), max_margin_ranking_loss(s, 0.2), atol=1e-7)


@pytest.mark.parametrize("train", [False, True])
def test_reference_pooling_radius_and_loss_equal_tvr(train):
    d, nf = 16, 5
    r = ref.RefCLIPHead(stochastic=True, frames=nf, d=d)
    _perturb(r)
    head = XPoolHead(d, 1, 0.3)
    head.load_state_dict({k.replace("layer_norm", "ln"): v for k, v in r.pool_frames.state_dict().items()})
    r.pool_frames.dropout = head.dropout  # tvr's faster mask draw (BitsDropout): the same masks on both sides
    r.train(train)
    head.train(train)
    g = torch.Generator().manual_seed(1)
    t, v = torch.randn(6, d, generator=g) * 3, torch.randn(6, nf, d, generator=g) * 3
    torch.manual_seed(4)
    a = r.pool_frames(t, v)
    torch.manual_seed(4)
    b = head.pool_train(t, v)  # tvr's training path: same dropout draws
    assert torch.allclose(a, b, atol=1e-5)
    m = create_model("tmass", feature_dims={"clip": d, "clip_text": d}, num_frames=nf)
    m.radius.linear.load_state_dict(r.stochastic.linear_proj.state_dict())
    keep = torch.ones(6, nf, dtype=torch.bool)
    assert torch.allclose(torch.exp(r.stochastic(t, v)), m.paired_radius(t, v, keep), atol=1e-5)
    sims = ref.ref_sim_training(t, a)
    assert torch.allclose(sims, F.cosine_similarity(t[None], a, dim=-1).t(), atol=1e-6)
    assert torch.allclose(ref.ref_clip_loss(sims, r.logit_scale), symmetric_cross_entropy(sims, r.logit_scale), atol=1e-6)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("bench") / "s.zarr")
    bench.make_store(url, items=24, captions=2)
    return url


@pytest.mark.slow
@pytest.mark.parametrize("model", bench.MODELS)
def test_children_time_a_few_steps(small_store, model):
    """Both sides run a few real steps in-process and report per-step times (figures, never a timing check)."""
    t = bench.tvr_child(model, small_store, rounds=1, batch=8)
    r = bench.ref_child(model, n_videos=19, captions=2, steps=2, rounds=1, batch=8)
    for res in (t, r):
        assert res["steps"] >= 1 and len(res["ms"]) == 1 and res["ms"][0] > 0


@pytest.mark.slow
def test_main_prints_the_comparison_table(small_store, capsys):
    assert bench.main(["--model", "xpool", "--store", small_store, "--items", "24", "--captions", "2", "--rounds", "1",
                       "--inner", "1", "--batch", "xpool=8"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("xpool"))
    assert "x" in row and len(row.split()) >= 6


@pytest.mark.slow
def test_run_child_samples_memory_until_the_result(small_store):
    """Peak PSS is sampled while the child trains; the exit-inclusive peak is reported beside it, never below it."""
    res = bench.run_child(["--child", "tvr", "--model", "xpool", "--store", small_store, "--inner", "1", "--batch", "8"])
    assert res["steps"] > 0 and len(res["ms"]) == 1
    assert 100 < res["peak_mb"] <= res["exit_peak_mb"]
