"""`tvr-store`: inspect a feature store from the shell (info, plot) and build synthetic ones (synth)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from store.schema import StoreError


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with the info, plot and (optional) synth subcommands."""
    parser = argparse.ArgumentParser(prog="tvr-store", description="Inspect a tvr feature store.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="per-feature counts of OK/ABSENT/FAILED/PENDING rows and top reasons")
    info.add_argument("store", help="store path or URL")
    info.add_argument("--json", action="store_true",
                      help='print one JSON document: {"items": N, "features": {name: {"ok", "absent", "failed", '
                           '"pending"}}, "failure_reasons": {name: [{"reason", "count"}]}}')
    info.add_argument("--top", type=int, default=5, help="how many reasons to list per feature")
    plot = sub.add_parser("plot", help="save the availability figure (PNG, SVG, PDF by extension)")
    plot.add_argument("store", help="store path or URL")
    plot.add_argument("out", help="output image path")
    from store import synth

    synth.add_arguments(sub.add_parser("synth", help="build a synthetic store with planted structure"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from store import synth

        return int(synth.run(args))
    from store.inspect import availability_figure, coverage_table, summary
    from store.zarr_store import FeatureStore

    try:
        store = FeatureStore.open(args.store)
    except StoreError as e:
        print(f"tvr-store {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "info":
        if args.json:
            print(json.dumps(summary(store, args.top), sort_keys=True))
        else:
            print(coverage_table(store, args.top))
        return 0
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"tvr-store plot: folder {out.parent} does not exist; create it or pick another output path",
              file=sys.stderr)
        return 2
    try:
        availability_figure(store).savefig(out, dpi=100)
    except ValueError as e:  # matplotlib: unknown format from the extension
        print(f"tvr-store plot: cannot write {out}: {e}; use a .png, .svg or .pdf name", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
