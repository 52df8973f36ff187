"""The CLI surface without running extraction: options, --random-weights modes, Ray address choice, output text."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest

from pipelines.cli import build_parser, parse_config
from pipelines.config import ConfigError, ExtractConfig
from pipelines.run import RunResult, _progress, connect_ray, describe_weights


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["data", "--store", "s.zarr"], False),
        (["data", "--store", "s.zarr", "--random-weights"], True),
        (["--random-weights", "data", "--store", "s.zarr"], True),  # bare flag never swallows SOURCE
        (["data", "--random-weights", "missing", "--store", "s.zarr"], "missing"),
        (["data", "--store", "s.zarr", "--random-weights=all"], True),
    ],
)
def test_random_weights_modes(argv: list[str], want: bool | str) -> None:
    cfg = parse_config(argv).validate()
    assert cfg.source == "data" and cfg.store == "s.zarr" and cfg.random_weights == want


def test_random_weights_rejects_unknown_mode_and_config_values(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["d", "--random-weights=some"])
    assert "expected 'all' or 'missing'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="random_weights must be"):
        ExtractConfig(source="d", store="s", random_weights="sometimes").validate()
    f = tmp_path / "c.yaml"
    f.write_text("random_weights: missing\nallow_download: true\nworkers: 3\n")
    cfg = parse_config(["d", "--store", "s", "--config", str(f), "--workers", "2"]).validate()
    assert (cfg.random_weights, cfg.allow_download, cfg.workers) == ("missing", True, 2)  # command line wins
    assert parse_config(["d", "--store", "s", "--config", str(f), "--no-download"]).allow_download is False
    assert parse_config(["d", "--store", "s"]).allow_download is True  # like torchvision: download when online


def test_extract_module_takes_the_same_arguments() -> None:
    import runpy

    with pytest.raises(SystemExit) as info:
        sys_argv = sys.argv
        sys.argv = ["pipelines.extract", "--help"]
        try:
            runpy.run_module("pipelines.extract", run_name="__main__")
        finally:
            sys.argv = sys_argv
    assert info.value.code == 0


def test_input_errors_come_before_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines import cli

    def no_ray(cfg: Any) -> bool:
        raise AssertionError("Ray must not start for unusable input")

    monkeypatch.setattr("pipelines.run.connect_ray", no_ray)
    assert cli.main([str(tmp_path / "nope.csv"), "--store", str(tmp_path / "s.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "m.csv"
    bad.write_text("name,file\na,b\n")
    assert cli.main([str(bad), "--store", str(tmp_path / "s.zarr")]) == 2
    assert "'id' and 'path' columns" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


class _FakeRay:
    """Records ray.init calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kw: Any) -> None:
        self.calls.append(kw)


@pytest.mark.parametrize(
    ("flag", "env", "want"),
    [(None, None, None), (None, "ray://head:10001", "ray://head:10001"), ("10.0.0.1:6379", "auto", "10.0.0.1:6379")],
)
def test_connect_ray_joins_address_or_starts_local(monkeypatch: pytest.MonkeyPatch, flag: str | None,
                                                   env: str | None, want: str | None) -> None:
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert connect_ray(ExtractConfig(source="d", store="s", address=flag)) is True
    (call,) = fake.calls
    assert call.get("address") == want
    if want is None:  # local Ray: workers must import this repository's packages
        assert str(Path(__file__).resolve().parents[1]) in call["runtime_env"]["env_vars"]["PYTHONPATH"]


def test_summary_table_weights_and_progress_text() -> None:
    res = RunResult(coverage={"clip": {"ok": 3, "absent": 1, "failed": 2, "pending": 0}},
                    reasons={"clip": [("decode_error", 2)]}, tasks=6, seconds=1.0, exit_code=1,
                    weights={"clip": {"random": True, "seed": 0, "reason": "weights not found: ViT-B-32.pt"},
                             "glove": {"file": "glove.npy", "sha256": "ab" * 32}})
    table = res.table().splitlines()
    assert table[1].split() == ["clip", "3", "1", "2", "0", "decode_error", "x2"]
    w = res.weights_table()
    assert "clip" in w and "SEEDED RANDOM" in w and "ViT-B-32.pt" in w and "NOT meaningful" in w
    assert "real weights glove.npy" in w
    assert describe_weights({"random": True, "seed": 3}).startswith("SEEDED RANDOM weights (seed 3; --random-weights)")
    assert "UNPINNED" not in w
    assert "UNPINNED" in describe_weights({"file": "mine.pt", "sha256": "cd" * 32, "unpinned": True})
    both = {"model": {"file": "a.pth", "sha256": "0" * 64}, "pca": {"file": "p.npz", "sha256": "1" * 64, "unpinned": True}}
    assert describe_weights(both) == "real weights a.pth, p.npz (UNPINNED)"
    buf = io.StringIO()
    bar = _progress(4, True, buf)
    bar.update(1)
    bar.set_postfix(ok=1, failed=0, refresh=False)
    bar.update(1)
    bar.set_postfix(ok=1, failed=1, refresh=False)
    bar.close()
    text = buf.getvalue()
    assert "2/4" in text and "failed=1" in text and "ok=1" in text and "<" in text  # done/total, counts, ETA


def test_strict_lists_unreadable_items_with_their_problem_and_dropped_captions_are_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines import cli

    def no_ray(cfg: Any) -> bool:
        raise AssertionError("Ray must not start here")

    monkeypatch.setattr("pipelines.run.connect_ray", no_ray)
    (tmp_path / "clips.mp4").mkdir()
    (tmp_path / "a.mp4").write_bytes(b"x")
    man = tmp_path / "m.jsonl"
    man.write_text('{"id": "d", "path": "clips.mp4"}\n{"id": "a", "path": "a.mp4", "captions": ["x", " ", "y"]}\n')
    assert cli.main([str(man), "--store", str(tmp_path / "s.zarr"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "1 item file(s)" in err and "clips.mp4 is a directory" in err and "not found" not in err
    with pytest.raises(AssertionError, match="Ray must not start"):
        cli.main([str(man), "--store", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err
    assert "dropped 1 empty caption(s)" in err and "(a#1)" in err
