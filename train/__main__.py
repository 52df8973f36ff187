"""`python -m train ...`: the same as `tvr-train`."""
from __future__ import annotations

from train.cli import console

if __name__ == "__main__":
    console()
