"""`python -m pipelines.extract ...`: the same as `tvr-extract` (the entrypoint for `ray job submit`)."""
from __future__ import annotations

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
