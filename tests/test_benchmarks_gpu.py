"""benchmarks/bench_gpu.py on a machine without CUDA: a clear message, exit 0, nothing measured."""
from __future__ import annotations

import pytest


def test_bench_gpu_without_cuda_says_so_and_exits_cleanly(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from benchmarks import bench_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--items", "1"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "nothing measured" in out
