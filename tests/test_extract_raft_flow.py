"""RAFT wrapper: replicate padding to /8 and exact unpadding, flow scaling, weights loading, real torchvision RAFT."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torchvision.models.optical_flow import raft_small

from extract import WeightsError
from extract.raft_flow import (
    DEFAULT_FLOW_UPDATES,
    DEFAULT_RAFT,
    RAFT_WEIGHTS,
    FlowError,
    RaftFlow,
    center_crop,
    pad_to_multiple,
    scale_flow,
    unpad,
)
from tests._fakes import FakeWeightsFactory


def _frames(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Seeded float frames in [0, 255]."""
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(seed)).float()


class CoordFlow(torch.nn.Module):
    """Stand-in for RAFT: returns the padded pixel coordinates as flow, and records its input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, a: torch.Tensor, b: torch.Tensor, num_flow_updates: int = 12) -> list[torch.Tensor]:
        self.seen.append(a)
        n, _, h, w = a.shape
        ys, xs = torch.meshgrid(torch.arange(h) * 1.0, torch.arange(w) * 1.0, indexing="ij")
        return [torch.stack([xs, ys]).expand(n, 2, h, w).clone()]


def test_pad_is_centred_replicate_and_unpad_inverts_it() -> None:
    x = _frames(1, 50, 61)
    padded, pads = pad_to_multiple(x)
    assert padded.shape[-2:] == (56, 64)
    assert pads == (3, 3, 1, 2)
    torch.testing.assert_close(padded[..., 0, 1:-2], x[..., 0, :].expand_as(padded[..., 0, 1:-2]))  # top row copies
    torch.testing.assert_close(padded[..., 3:-3, 0], x[..., :, 0])  # left column copies
    torch.testing.assert_close(unpad(padded, pads), x, rtol=0, atol=0)
    same, none = pad_to_multiple(_frames(1, 16, 24))
    assert none == (0, 0, 0, 0) and same.shape[-2:] == (16, 24)


def test_center_crop_takes_the_floor_centre() -> None:
    x = torch.arange(7 * 9.0).reshape(1, 7, 9)
    out = center_crop(x, 4)
    assert out.shape == (1, 4, 4)
    assert out[0, 0, 0].item() == 1 * 9 + 2  # top = (7-4)//2 = 1, left = (9-4)//2 = 2
    with pytest.raises(FlowError, match="smaller than"):
        center_crop(x, 8)


def test_scale_flow_clamps_to_20_px_and_maps_to_unit_range() -> None:
    f = torch.tensor([-35.0, -20.0, -5.0, 0.0, 7.5, 20.0, 99.0])
    torch.testing.assert_close(scale_flow(f), torch.tensor([-1.0, -1.0, -0.25, 0.0, 0.375, 1.0, 1.0]))


def test_uint8_option_reproduces_the_reference_quantisation() -> None:
    f = torch.linspace(-25, 25, 1001)
    q = torch.round(128 + 255 / 40 * f.clamp(-20, 20))
    torch.testing.assert_close(scale_flow(f, quantize_uint8=True), 2 * q / 255 - 1)
    edges = scale_flow(torch.tensor([-20.0, 0.0, 20.0]), quantize_uint8=True)
    # -20 -> round(0.5) = 0 (half to even); 0 -> 128; +20 -> round(255.5) = 256: the reference exceeds 1
    torch.testing.assert_close(edges, torch.tensor([-1.0, 2 * 128 / 255 - 1, 2 * 256 / 255 - 1]))
    assert edges[2] > 1.0


def test_flow_comes_back_unpadded_from_padded_raft_input() -> None:
    flow = RaftFlow("raft_small.C_T_V2", random_init=True, num_flow_updates=1, batch_size=2)
    stub = CoordFlow()
    flow.model = stub
    x = _frames(3, 130, 133)
    out = flow(x, x)
    assert out.shape == (3, 2, 130, 133)
    assert [tuple(s.shape) for s in stub.seen] == [(2, 3, 136, 136), (1, 3, 136, 136)]  # padded, in batches of 2
    torch.testing.assert_close(stub.seen[0][0, :, 3:-3, 1:-2], x[0] * 2 / 255 - 1)  # [-1, 1] input, centred
    assert out[0, 0, 0, 0].item() == 1 and out[0, 1, 0, 0].item() == 3  # first kept pixel = padded (3, 1)
    assert out[0, 0, -1, -1].item() == 133 and out[0, 1, -1, -1].item() == 132


def test_real_raft_small_random_weights_shapes_and_determinism() -> None:
    x, y = _frames(3, 130, 133, 1), _frames(3, 130, 133, 2)
    a = RaftFlow("raft_small.C_T_V2", random_init=True, seed=3, num_flow_updates=2, batch_size=3)
    b = RaftFlow("raft_small.C_T_V2", random_init=True, seed=3, num_flow_updates=2, batch_size=1)
    fa, fb = a(x, y), b(x, y)
    assert fa.shape == (3, 2, 130, 133) and torch.isfinite(fa).all()
    torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-4)  # batching does not change the flow
    torch.testing.assert_close(a(x, y), fa, rtol=0, atol=0)
    assert a.identity == {"random": True, "seed": 3}


def test_real_raft_large_default_on_a_tiny_frame() -> None:
    flow = RaftFlow(random_init=True, num_flow_updates=2)
    assert flow.spec.name == DEFAULT_RAFT and flow.arch == "raft_large"
    out = flow(_frames(1, 128, 131, 4), _frames(1, 128, 131, 5))
    assert out.shape == (1, 2, 128, 131) and torch.isfinite(out).all()


def test_weights_file_loads_through_resolve_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fake_weights: FakeWeightsFactory) -> None:
    torch.manual_seed(7)
    state = raft_small(weights=None).state_dict()
    spec = RAFT_WEIGHTS["raft_small.C_T_V2"]
    # DataParallel-style prefix is stripped
    digest = fake_weights({f"module.{k}": v for k, v in state.items()}, spec.filename).sha256
    with pytest.raises(WeightsError, match="checksum mismatch"):  # the real spec pins torchvision's prefix
        RaftFlow("raft_small.C_T_V2", weights_dir=tmp_path)
    monkeypatch.setitem(RAFT_WEIGHTS, "raft_small.C_T_V2", dataclasses.replace(spec, sha256=digest[:8]))
    flow = RaftFlow("raft_small.C_T_V2", weights_dir=tmp_path, num_flow_updates=1)
    assert flow.identity == {"file": spec.filename, "sha256": digest}
    for name, value in flow.model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def test_foreign_weights_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = RAFT_WEIGHTS["raft_large.C_T_V2"]
    path = tmp_path / "other.pth"
    torch.save(raft_small(weights=None).state_dict(), path)  # small weights for the large model
    unpinned = dataclasses.replace(spec, sha256="", meta={**spec.meta, "sha256_prefix": ""}, filename="other.pth")
    monkeypatch.setitem(RAFT_WEIGHTS, spec.name, unpinned)
    with pytest.raises(FlowError, match=r"other\.pth.*load RAFT weights"):
        RaftFlow(spec.name, weights_path=path)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(FlowError, match="unknown RAFT weights"):
        RaftFlow("raft_huge", random_init=True)
    with pytest.raises(FlowError, match="num_flow_updates"):
        RaftFlow(random_init=True, num_flow_updates=0)
    flow = RaftFlow("raft_small.C_T_V2", random_init=True, num_flow_updates=1)
    with pytest.raises(FlowError, match="equal shape"):
        flow(_frames(1, 16, 16), _frames(1, 16, 24))
    with pytest.raises(FlowError, match="at least 128 px"):
        flow(_frames(1, 120, 160), _frames(1, 120, 160))


def test_every_spec_pins_the_torchvision_hash_prefix() -> None:
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights

    urls = {w.url for enum in (Raft_Large_Weights, Raft_Small_Weights) for w in enum}
    for spec in RAFT_WEIGHTS.values():
        assert spec.url in urls, spec.url
        assert spec.sha256 and spec.filename.endswith(f"-{spec.sha256}.pth")
    # default = the reference tool's raft-sintel.pth (paper weights, torchvision's C_T_SKHT_V1 port), 20 iterations
    assert RAFT_WEIGHTS[DEFAULT_RAFT].url == Raft_Large_Weights.C_T_SKHT_V1.url
    assert DEFAULT_FLOW_UPDATES == 20 and RaftFlow(random_init=True).num_flow_updates == 20
    assert f"{Raft_Large_Weights.DEFAULT.name}" in {s.name.split(".")[1] for s in RAFT_WEIGHTS.values()}
