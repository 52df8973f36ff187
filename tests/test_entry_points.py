"""Every console script also runs as `python -m PACKAGE`, with the same program behind both."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _after_usage(out: str) -> str:
    """Help text after its first line (argparse names the program after argv[0] there)."""
    return out.split("\n", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_python_m_package_runs_the_console_script(script: str) -> None:
    module, func = SCRIPTS[script].split(":")
    package = module.split(".")[0]
    via_m = subprocess.run([sys.executable, "-m", package, "--help"], cwd=REPO, capture_output=True, text=True)
    direct = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}(['--help']))"],
                            cwd=REPO, capture_output=True, text=True)
    assert via_m.returncode == 0 == direct.returncode, via_m.stderr + direct.stderr
    assert via_m.stdout.startswith("usage:") and _after_usage(via_m.stdout) == _after_usage(direct.stdout)
