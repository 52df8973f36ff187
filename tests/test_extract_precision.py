"""--precision: bf16 autocast in frame-step extractors, recorded in provenance and compared on reruns; OOM-free
fp32 stays as before (no new option recorded)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from extract import FrameStepExtractor, StepPolicy, create_extractor
from pipelines.config import ConfigError, ExtractConfig
from pipelines.rerun import settings_diffs
from store.schema import FeatureSpec
from tests._extractors import ECHO_WEIGHTS, batches


class TinyLinear(FrameStepExtractor):
    """A real matmul (autocast applies to it): features = W @ mean pixel + b."""

    name = "tiny_linear"

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self.policy = StepPolicy(fps=5.0, max_steps=64)
        self.batch_size = 4
        self.spec = FeatureSpec(name="tiny_linear", dim=8, max_steps=64, dtype="float32")
        self.model = self.build_model(lambda: torch.nn.Linear(3, 8), ECHO_WEIGHTS)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames.reshape(len(frames), -1, 3).mean(1).astype(np.float32) / 255 * 37.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _row(ex: FrameStepExtractor) -> np.ndarray:
    s = ex.start(SimpleNamespace(kind="video", duration=2.0))
    for b in batches(50):
        s.add_frames(b)
    return s.finish().values


def test_bf16_autocasts_the_model_and_is_recorded() -> None:
    fp32, bf16 = TinyLinear(random_init=True), TinyLinear(random_init=True, precision="bf16")
    a, b = _row(fp32), _row(bf16)
    # independent: the same affine map computed with bf16 inputs and weights (what autocast does), fp32 accumulate
    x = torch.from_numpy((np.arange(0, 50, 5) % 256).astype(np.float32)[:, None].repeat(3, 1) / 255 * 37.1)
    w, bias = fp32.model.weight, fp32.model.bias
    want = (x.bfloat16() @ w.bfloat16().T + bias.bfloat16()).float().numpy()
    np.testing.assert_allclose(b, want, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(a, (x @ w.T + bias).detach().numpy(), rtol=1e-6, atol=1e-6)
    assert not np.array_equal(a, b)  # bf16 really ran
    assert fp32.provenance()["precision"] == "fp32" and "precision" not in fp32.provenance()["options"]
    assert bf16.provenance()["precision"] == "bf16" and bf16.provenance()["options"]["precision"] == "bf16"
    # fp16 is CUDA-only (as `half`): on CPU it runs, and is recorded, as fp32
    assert TinyLinear(random_init=True, precision="fp16", device="cpu").provenance()["precision"] == "fp32"


def test_a_rerun_with_another_precision_is_a_settings_difference() -> None:
    old = TinyLinear(random_init=True).provenance()
    new = TinyLinear(random_init=True, precision="bf16").provenance()
    assert settings_diffs(old, new) == ['options.precision: stored "(not recorded)", this run "bf16"']
    assert settings_diffs(old, TinyLinear(random_init=True).provenance()) == []


def test_bad_precision_values_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        TinyLinear(random_init=True, precision="fp8")
    import tests.pipelines_testext  # noqa: F401
    with pytest.raises(ValueError, match="cannot run in bf16.*--precision fp16 or fp32"):
        create_extractor("test_rms", random_init=True, precision="bf16")
    with pytest.raises(ConfigError, match="--precision must be one of"):
        ExtractConfig(source="x", store="y", precision="half").validate()
    from pipelines.cli import parse_config

    assert parse_config(["x", "--store", "y", "--precision", "bf16"]).precision == "bf16"
