"""I3D `compat="video_features"`: BatchNorm eps 1e-5 and build-time "SAME" padding, against a hand-written reference.

The reference below re-implements v-iashin/video_features' `models/i3d/i3d_src/i3d_net.py` numerics from its
description (read from that file): `get_padding_shape` pads ``max(kernel - stride, 0)`` split ``(p // 2, p - p // 2)``
whatever the input length; `Unit3Dpy` = zero pad + conv + `torch.nn.BatchNorm3d(c)` (eps 1e-5) + ReLU;
`MaxPool3dTFPadding` = zero pad + `MaxPool3d(kernel, stride, ceil_mode=True)`. BatchNorm is written out by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from extract.i3d_net import (
    InceptionI3d,
    MaxPool3dSame,
    Unit3d,
    load_i3d_checkpoint,
    min_input,
    static_padding,
    trunk_length,
)

VF_EPS = 1e-5


def _pads(kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """video_features' padding, in F.pad order (W, H, T), from its formula."""
    out: list[int] = []
    for k, s in zip(reversed(kernel), reversed(stride)):
        p = max(k - s, 0)
        out += [p // 2, p - p // 2]
    return out


def _ref_unit(x: torch.Tensor, unit: Unit3d) -> torch.Tensor:
    """Zero pad, conv, BatchNorm with eps 1e-5 written out, ReLU."""
    y = F.conv3d(F.pad(x, _pads(unit.kernel, unit.stride)), unit.conv.weight, unit.conv.bias, stride=unit.stride)
    if unit.bn is not None:
        bn, v = unit.bn, (1, -1, 1, 1, 1)
        y = (y - bn.running_mean.view(v)) / torch.sqrt(bn.running_var.view(v) + VF_EPS) * bn.weight.view(v) \
            + bn.bias.view(v)
    return F.relu(y) if unit.relu else y


def _ref_pool(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero pad, then torch's max pool in ceil mode (what MaxPool3dTFPadding does)."""
    return F.max_pool3d(F.pad(x, _pads(kernel, stride)), kernel, stride, ceil_mode=True)


def _ref_mixed(x: torch.Tensor, block: torch.nn.Module) -> torch.Tensor:
    """One Mixed block through the reference units."""
    b1 = _ref_unit(_ref_unit(x, block.b1[0]), block.b1[1])
    b2 = _ref_unit(_ref_unit(x, block.b2[0]), block.b2[1])
    b3 = _ref_unit(_ref_pool(x, (3, 3, 3), (1, 1, 1)), block.b3)
    return torch.cat([_ref_unit(x, block.b0), b1, b2, b3], dim=1)


def _ref_trunk(m: InceptionI3d, x: torch.Tensor) -> torch.Tensor:
    """video_features' forward up to Mixed_5c, using `m`'s parameters (not its forward)."""
    x = _ref_pool(_ref_unit(x, m.conv_1a), (1, 3, 3), (1, 2, 2))
    x = _ref_pool(_ref_unit(_ref_unit(x, m.conv_2b), m.conv_2c), (1, 3, 3), (1, 2, 2))
    x = _ref_pool(_ref_mixed(_ref_mixed(x, m.mixed_3b), m.mixed_3c), (3, 3, 3), (2, 2, 2))
    for name in ("4b", "4c", "4d", "4e", "4f"):
        x = _ref_mixed(x, getattr(m, f"mixed_{name}"))
    x = _ref_pool(x, (2, 2, 2), (2, 2, 2))
    return _ref_mixed(_ref_mixed(x, m.mixed_5b), m.mixed_5c)


@pytest.fixture(scope="module")
def pair() -> tuple[InceptionI3d, InceptionI3d]:
    """(tf, video_features) models with the same weights; small BN variances, where eps matters as in real files."""
    torch.manual_seed(0)
    tf = InceptionI3d(in_channels=2, num_classes=0)
    for module in tf.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.05, 0.05)
            module.running_var.uniform_(1e-4, 3e-3)
            module.bias.data.uniform_(-0.1, 0.1)
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data.mul_(0.05)  # keep activations at the scale of the small variances
    vf = InceptionI3d(in_channels=2, num_classes=0, compat="video_features")
    vf.load_state_dict(tf.state_dict())
    return tf.eval(), vf.eval()


def _clip(t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """A seeded flow clip in [-1, 1]."""
    return torch.rand(1, 2, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _with_eps(model: InceptionI3d, eps: float) -> InceptionI3d:
    """A copy of a tf model with every BatchNorm eps replaced (isolates the padding difference)."""
    import copy

    out = copy.deepcopy(model)
    for module in out.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.eps = eps
    return out


def test_static_padding_is_the_build_time_rule() -> None:
    assert static_padding(7, 2) == (2, 3) and static_padding(3, 2) == (0, 1)
    assert static_padding(3, 1) == (1, 1) and static_padding(2, 2) == (0, 0) and static_padding(1, 1) == (0, 0)


def test_unit_uses_eps_1e5_and_static_padding_at_odd_length() -> None:
    torch.manual_seed(3)
    unit = Unit3d(2, 4, (7, 7, 7), (2, 2, 2), compat="video_features")
    unit.bn.running_mean.uniform_(-0.1, 0.1)
    unit.bn.running_var.uniform_(1e-4, 1e-3)
    unit.eval()
    assert unit.bn.eps == VF_EPS
    x = torch.randn(1, 2, 11, 9, 10)
    with torch.no_grad():
        got, ref = unit(x), _ref_unit(x, unit)
        assert got.shape == (1, 4, 5, 4, 5)  # (11 + 5 - 7) // 2 + 1 = 5 steps; TF "SAME" gives ceil(11 / 2) = 6
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        tf = Unit3d(2, 4, (7, 7, 7), (2, 2, 2))
        tf.load_state_dict(unit.state_dict())
        assert tf.eval()(x).shape == (1, 4, 6, 5, 5)


def test_max_pool_windows_at_odd_length_by_hand() -> None:
    x = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]).reshape(1, 1, 5, 1, 1)  # ReLU outputs are >= 0
    vf = MaxPool3dSame((3, 1, 1), (2, 1, 1), compat="video_features")(x).flatten().tolist()
    tf = MaxPool3dSame((3, 1, 1), (2, 1, 1))(x).flatten().tolist()
    assert vf == [4.0, 5.0, 5.0]  # zero pad (0, 1), ceil mode: windows x[0:3], x[2:5], x[4:5] + pad
    assert tf == [3.0, 4.0, 5.0]  # pad (1, 1): windows x[-1:2], x[1:4], x[3:6]


@pytest.mark.parametrize(("frames", "height"), [(10, 32), (11, 32), (16, 33)])
def test_trunk_equals_the_video_features_reference_where_padding_differs(
        pair: tuple[InceptionI3d, InceptionI3d], frames: int, height: int) -> None:
    tf, vf = pair
    # 10 frames: odd length (5) at MaxPool3d_4a; 11: odd at Conv3d_1a; height 33: odd at Conv3d_1a in space
    x = _clip(frames, height, 32)
    with torch.no_grad():
        got, ref = vf.trunk(x), _ref_trunk(tf, x)
        c = "video_features"
        assert got.shape == ref.shape == (1, 1024, trunk_length(frames, 0, c), trunk_length(height, 1, c), 1)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        same_eps = _with_eps(tf, VF_EPS).trunk(x)  # TF padding, video_features eps: only the padding differs
    if same_eps.shape == got.shape:  # far beyond the 1e-5 agreement of the even-length test below
        assert (got - same_eps).abs().max() > 1e-3
    else:
        assert height % 2 == 1 and same_eps.shape[3] == -(-height // 32)


def test_at_even_lengths_only_eps_differs(pair: tuple[InceptionI3d, InceptionI3d]) -> None:
    tf, vf = pair
    x = _clip(16, 32, 32, seed=2)  # every strided op sees an even length: both paddings agree
    with torch.no_grad():
        got = vf.trunk(x)
        torch.testing.assert_close(got, _with_eps(tf, VF_EPS).trunk(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, _ref_trunk(tf, x), rtol=1e-4, atol=1e-5)
        default = tf.trunk(x)
        cos = F.cosine_similarity(default.flatten(), got.flatten(), dim=0)
        assert cos < 0.999  # eps 1e-3 vs 1e-5 at small BatchNorm variances is a real change


def test_trunk_length_and_minimum_input_per_compat(pair: tuple[InceptionI3d, InceptionI3d]) -> None:
    tf, vf = pair
    for t in (9, 10, 11, 12):
        x = _clip(t, 32, 32)
        with torch.no_grad():
            assert vf.trunk(x).shape[2] == trunk_length(t, 0, "video_features")
            assert tf.trunk(x).shape[2] == trunk_length(t, 0, "tf") == -(-t // 8)
    assert min_input("tf") == (9, 193)
    assert min_input("video_features") == (10, 194)
    with pytest.raises(ValueError, match="video_features compat.*10 frames"):
        vf.features(torch.zeros(1, 2, 9, 224, 224))
    with pytest.raises(ValueError, match="compat must be one of"):
        InceptionI3d(2, 0, compat="keras")


def test_checkpoint_loads_under_either_compat(pair: tuple[InceptionI3d, InceptionI3d], tmp_path) -> None:
    from extract.i3d_net import export_state_dict

    tf, _ = pair
    path = tmp_path / "i3d_flow.pt"
    torch.save(export_state_dict(tf, "hassony2"), path)
    model, layout = load_i3d_checkpoint(path, in_channels=2, compat="video_features")
    assert layout == "hassony2" and model.compat == "video_features" and model.conv_1a.bn.eps == VF_EPS
    assert load_i3d_checkpoint(path, in_channels=2)[0].conv_1a.bn.eps == 1e-3
