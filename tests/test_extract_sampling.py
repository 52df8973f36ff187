"""extract.sampling: step policies (rate or count), uniform times, the 25 fps frame index <-> time mapping."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from extract import StepPolicy
from extract.sampling import frame_indices, frame_times, uniform_times


def test_rate_policy_times() -> None:
    p = StepPolicy(fps=1.0, max_steps=64)
    np.testing.assert_allclose(p.times(3.0), [0, 1, 2])
    np.testing.assert_allclose(p.times(3.04), [0, 1, 2, 3])
    np.testing.assert_allclose(p.times(0.3), [0])
    np.testing.assert_allclose(StepPolicy(fps=2.0).times(1.5), [0, 0.5, 1.0])
    capped = StepPolicy(fps=1.0, max_steps=4).times(100.0)  # beyond max_steps: spread over the whole item
    np.testing.assert_allclose(capped, [12.5, 37.5, 62.5, 87.5])
    assert StepPolicy(fps=1.0, max_steps=4).steps == 4


def test_count_policy_middle_of_segments_and_images() -> None:
    p = StepPolicy(count=4)
    np.testing.assert_allclose(p.times(2.0), [0.25, 0.75, 1.25, 1.75])
    assert p.steps == 4 and p.max_steps == 4
    np.testing.assert_allclose(uniform_times(1.0, 2), [0.25, 0.75])
    for pol in (p, StepPolicy(fps=1.0)):
        np.testing.assert_array_equal(pol.times(0.0), [0.0])  # images: one step at 0


@pytest.mark.parametrize("kw", [{}, {"fps": 1.0, "count": 3}, {"fps": 0.0}, {"count": 0}, {"fps": 1.0, "max_steps": 0}])
def test_bad_policies_raise(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="StepPolicy"):
        StepPolicy(**kw)
    with pytest.raises(ValueError, match="duration"):
        StepPolicy(fps=1.0).times(float("nan"))


def test_frame_index_mapping() -> None:
    t = np.array([0.0, 0.04, 0.039999999, 1.0, 0.5 / 25, 99.0])
    np.testing.assert_array_equal(frame_indices(t), [0, 1, 1, 25, 0, 2475])  # floor(t*25 + 1e-6)
    np.testing.assert_array_equal(frame_indices(t, n_frames=30), [0, 1, 1, 25, 0, 29])
    np.testing.assert_allclose(frame_times(np.array([0, 25, 13])), [0.0, 1.0, 0.52])
    assert frame_times(np.array([1])).dtype == np.float32
