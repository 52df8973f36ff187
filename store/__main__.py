"""`python -m store ...`: the same as `tvr-store`."""
from __future__ import annotations

import sys

from store.cli import main

if __name__ == "__main__":
    sys.exit(main())
