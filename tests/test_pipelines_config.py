"""Option validation: every numeric option is range-checked with a clear error before anything starts; --fps is
gone with an explanation; --frame-rule reaches the config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines import cli
from pipelines.config import ConfigError, ExtractConfig


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a run gets as far as starting Ray."""

    def refuse(cfg: Any) -> bool:
        raise AssertionError("Ray must not start for an unusable option")

    monkeypatch.setattr("pipelines.run.connect_ray", refuse)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--decode-height", "-5"], "--decode-height must be >= 1, got -5"),
        (["--decode-height", "0"], "--decode-height must be >= 1, got 0"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--max-retries", "-1"], "--max-retries must be >= 0"),
        (["--seed", "-3"], "--seed must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--decode-queue", "-1"], "--decode-queue must be >= 0"),
        (["--caption-chunk", "0"], "--caption-chunk must be >= 1"),
        (["--gpus-per-worker", "-0.5"], "--gpus-per-worker must be >= 0"),
        (["--gpus-per-worker", "nan"], "--gpus-per-worker must be a number, got nan"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
        (["--fps", "10"], "'fps' was removed: every extractor picks its steps from the fixed 25 fps decode grid"),
    ],
)
def test_bad_numbers_exit_2_with_the_option_named(tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str],
                                                  argv: list[str], match: str) -> None:
    (tmp_path / "a.mp4").write_bytes(b"x")
    assert cli.main([str(tmp_path), "--store", str(tmp_path / "s.zarr"), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("tvr-extract: error:")
    assert not (tmp_path / "s.zarr").exists()


def test_config_file_values_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--decode-height must be an integer, got '128px'"):
        ExtractConfig(source="d", store="s").updated({"decode-height": "128px"}).validate()
    with pytest.raises(ConfigError, match="--batch-size must be an integer, got True"):
        ExtractConfig(source="d", store="s", batch_size=True).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="config file 'c.yaml': 'fps' was removed"):
        ExtractConfig().updated({"fps": 5}, where="config file 'c.yaml'")
    with pytest.raises(ConfigError, match="update_manifest must be true or false"):
        ExtractConfig(source="d", store="s", update_manifest="yes").validate()  # type: ignore[arg-type]


def test_frame_rule_option_and_its_check() -> None:
    from extract.decode import FRAME_RULES

    assert ExtractConfig().frame_rule == "nearest" and set(FRAME_RULES) == {"nearest", "floor"}
    assert cli.parse_config(["d", "--store", "s", "--frame-rule", "floor"]).frame_rule == "floor"
    assert cli.parse_config(["d", "--store", "s", "--update-manifest"]).update_manifest is True
    with pytest.raises(SystemExit):
        cli.parse_config(["d", "--store", "s", "--frame-rule", "round"])
    with pytest.raises(ConfigError, match="--frame-rule must be one of nearest, floor, got 'round'"):
        ExtractConfig(source="d", store="s", frame_rule="round").validate()


def test_defaults_validate() -> None:
    ExtractConfig(source="d", store="s").validate()
    ExtractConfig(source="d", store="s", decode_height=1, workers=1, gpus_per_worker=0.0, queue_size=0).validate()
