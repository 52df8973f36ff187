"""train/models/_linear.py: the oneDNN linear equals F.linear in values and gradients; MEE's GEMMs go through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.models import create_model
from train.models._linear import _OneDnnLinear, linear, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _grads(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, g: torch.Tensor):
    """(output, grads of x, w, b) of fn(x, w, b) under upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w) + ((b,) if b is not None else ())]
    out = fn(*leaves[:2], leaves[2] if b is not None else None)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


@needs_onednn
@pytest.mark.parametrize("n,i,o", [(128, 300, 64), (1, 7, 5), (33, 2048, 130)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_f_linear(n, i, o, bias):
    g = torch.Generator().manual_seed(n + i + o)
    x = torch.randn(n, i, generator=g).requires_grad_()
    w = (torch.randn(o, i, generator=g) / i**0.5).requires_grad_()
    b = torch.randn(o, generator=g).requires_grad_() if bias else None
    up = torch.randn(n, o, generator=g)
    out, grads = _grads(linear, x, w, b, up)
    ref, ref_grads = _grads(F.linear, x, w, b, up)
    assert out.grad_fn is None and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_only_requested_gradients_and_strided_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 12, generator=g)[:, ::2]  # non-contiguous input without grad (a GEU's features)
    w = torch.randn(6, 12, generator=g)[:, ::2].t().t().requires_grad_()
    b = torch.randn(6, generator=g)
    out = linear(x, w, b)
    assert out.grad_fn.name().startswith("_OneDnnLinear")
    out.sum().backward()
    assert torch.allclose(w.grad, torch.ones(20, 6).t() @ x, atol=1e-5)
    assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(linear(x, w, b), F.linear(x, w, b), atol=1e-5)


def test_other_inputs_fall_back_to_f_linear():
    x, w, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    x3 = torch.randn(2, 4, 3)
    assert torch.equal(linear(x3, w.float(), b.float()), F.linear(x3, w.float(), b.float()))
    assert linear(torch.zeros(0, 3), w.float()).shape == (0, 2)


@needs_onednn
def test_mee_step_runs_its_linears_through_onednn():
    """Every GEU and mixture linear is a oneDNN one: no MKL addmm (~2x slower on the benchmark CPU) is left."""
    torch.manual_seed(0)
    m = create_model("mee", feature_dims={"resnet152": 6, "vggish": 4, "glove": 5}, text_clusters=4, audio_clusters=3)
    words, video = torch.randn(4, 3, 5), {}
    for f, d in (("resnet152", 6), ("vggish", 4)):
        video[f], video[f"{f}_mask"], video[f"{f}_avail"] = torch.randn(4, 2, d), torch.ones(4, 2, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    loss, _ = m.loss(m.encode_text({"words": words, "words_mask": torch.ones(4, 3, dtype=torch.bool)}), m.encode_video(video))
    seen, todo, names = set(), [loss.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        todo.extend(f for f, _ in fn.next_functions)
    assert "AddmmBackward0" not in names
    assert sum(n.startswith(_OneDnnLinear.__name__) for n in names) == 2 * 2 * 2 + 1  # fc + gate, 2 GEUs x 2 sides, moe
