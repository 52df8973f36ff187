"""`python -m train` runs `tvr-train`."""
import sys

from train.cli import main

sys.exit(main())
