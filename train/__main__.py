"""`python -m train ...`: the same as `tvr-train`."""
from __future__ import annotations

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
