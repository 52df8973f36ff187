"""ResNet-152: the weights' own preprocessing, pooled 2048-d output, real-weights loading, fp16 on CUDA."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.models import ResNet152_Weights, resnet152

from extract import WeightsError, create_extractor
from extract import resnet152 as R
from extract.transforms import frames_to_tensor, imagenet_classification
from store.schema import Status
from tests._fakes import FakeWeightsFactory


@pytest.fixture(scope="module")
def ex() -> R.ResNet152:
    """One random-weights CPU extractor for the module (construction costs seconds)."""
    return create_extractor("resnet152", random_init=True, device="cpu", max_steps=3)  # type: ignore[return-value]


def frames(n: int = 2, h: int = 150, w: int = 200, seed: int = 0) -> np.ndarray:
    """Seeded uint8 RGB frames."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("tag", "preset"), [("IMAGENET1K_V1", "imagenet_v1"), ("IMAGENET1K_V2", "imagenet_v2")])
def test_preset_equals_torchvision_transforms(tag: str, preset: str) -> None:
    f = frames(2, 150, 200)
    ref = torch.stack([getattr(ResNet152_Weights, tag).transforms()(torch.from_numpy(x).permute(2, 0, 1)) for x in f])
    ours = imagenet_classification(frames_to_tensor(f), preset)
    assert ours.shape == (2, 3, 224, 224)
    assert torch.equal(ours, ref)
    assert R.WEIGHTS[tag].preset == preset
    assert R.WEIGHTS[tag].url == getattr(ResNet152_Weights, tag).url


def test_output_is_the_global_average_pool(ex: R.ResNet152) -> None:
    f = frames(2, 120, 160)
    x = imagenet_classification(frames_to_tensor(f), "imagenet_v1")
    ref_model = resnet152(weights=None).eval()
    missing = ref_model.load_state_dict(ex.model.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"fc.weight", "fc.bias"} and not missing.unexpected_keys
    pooled: list[torch.Tensor] = []
    ref_model.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o.flatten(1)))
    with torch.no_grad():
        ref_model(x)
    got = ex.run_batch(f)
    assert got.shape == (2, 2048) and got.dtype == np.float32
    np.testing.assert_allclose(got, pooled[0].numpy(), rtol=1e-5, atol=1e-5)


def test_session_steps_at_1fps_capped(ex: R.ResNet152) -> None:
    assert ex.spec.dim == 2048 and ex.spec.dtype == "float16" and ex.spec.max_steps == 3
    assert ex.policy.fps == 1.0 and ex.spec.modality == "appearance"  # 1 fps by default
    prov = ex.provenance()  # V1 (resize 256, crop 224) is the default variant; random weights say so
    assert (prov["variant"], prov["preset"]) == ("IMAGENET1K_V1", "imagenet_v1")
    assert prov["weights"] == {"random": True, "seed": 0} and prov["weights_url"].endswith("resnet152-394f9c45.pth")
    s = ex.start(SimpleNamespace(kind="video", duration=4.0))  # 4 steps at 1 fps > max 3 -> uniform middles
    f = frames(100, 32, 40, seed=1)
    for a in range(0, 100, 25):
        idx = np.arange(a, a + 25)
        s.add_frames(SimpleNamespace(frames=f[idx], times=idx / 25, index=idx))
    r = s.finish()
    assert r.status == Status.OK and r.values.shape == (3, 2048) and r.values.dtype == np.float16
    np.testing.assert_allclose(r.times, np.floor(np.array([2 / 3, 2.0, 10 / 3]) * 25) / 25, rtol=1e-6)
    np.testing.assert_allclose(r.values[1].astype(np.float32), ex.run_batch(f[50:51])[0], rtol=2e-3, atol=1e-3)


def test_unknown_variant_and_bad_batch() -> None:
    with pytest.raises(ValueError, match="unknown variant 'V3'.*IMAGENET1K_V1"):
        create_extractor("resnet152", variant="V3", random_init=True)
    with pytest.raises(ValueError, match="batch_size"):
        create_extractor("resnet152", batch_size=0, random_init=True)


def test_missing_real_weights_error_names_the_file(tmp_path: Path, no_weights_anywhere: Path) -> None:
    with pytest.raises(WeightsError, match=r"resnet152-f82ba261\.pth.*download\.pytorch\.org.*--weights-dir"):
        create_extractor("resnet152", variant="IMAGENET1K_V2", weights_dir=tmp_path)


@pytest.mark.slow
def test_real_weights_file_loads_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                fake_weights: FakeWeightsFactory) -> None:
    """A full torchvision-layout checkpoint (with fc) in the weights dir is verified, loaded and recorded."""
    torch.manual_seed(7)
    src = resnet152(weights=None, zero_init_residual=True)
    w = fake_weights(src, R.WEIGHTS["IMAGENET1K_V1"].filename)
    path, digest = w.path, w.sha256
    with pytest.raises(WeightsError, match="394f9c45"):  # the pinned torch.hub prefix does not match a fake file
        create_extractor("resnet152", weights_dir=tmp_path, device="cpu")
    monkeypatch.setitem(R.WEIGHTS, "IMAGENET1K_V1", dataclasses.replace(R.WEIGHTS["IMAGENET1K_V1"], sha256=digest[:8]))
    ex = create_extractor("resnet152", weights_dir=tmp_path, device="cpu")
    assert ex.provenance()["weights"] == {"file": path.name, "sha256": digest}
    assert torch.equal(ex.model.layer4[2].conv3.weight, src.layer4[2].conv3.weight)
    src.fc = torch.nn.Identity()
    f = frames(1, 64, 64)
    with torch.no_grad():
        ref = src.eval()(imagenet_classification(frames_to_tensor(f), "imagenet_v1")).numpy()
    np.testing.assert_allclose(ex.run_batch(f), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_fp16_close_to_cpu(ex: R.ResNet152) -> None:
    gpu = create_extractor("resnet152", random_init=True, device="cuda", half=True, max_steps=3)
    assert gpu.half and gpu.provenance()["options"]["half"] is True
    f = frames(4, 120, 160)
    a, b = ex.run_batch(f), gpu.run_batch(f)
    np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2 * float(np.abs(a).max()))
