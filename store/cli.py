"""`tvr-store`: inspect (info, plot), check (verify), convert (compact) and synthesise (synth) feature stores."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from store.common import ConfigError, add_storage_options_argument, parse_storage_options
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
    verify = sub.add_parser("verify", help="check every OK row has its data and every status code is valid")
    verify.add_argument("store", help="store path or URL")
    verify.add_argument("--repair", action="store_true",
                        help="reset the bad rows to PENDING so the next tvr-extract run redoes them")
    compact = sub.add_parser("compact", help="convert a store (v1: one file per row) into a sharded v2 store and "
                                             "check both are equal")
    compact.add_argument("src", help="store to convert")
    compact.add_argument("dst", nargs="?", default=None,
                         help="new store path or URL (default: in place; the original is kept as SRC.v1-<time>)")
    plot = sub.add_parser("plot", help="save the availability figure (PNG, SVG, PDF by extension)")
    plot.add_argument("store", help="store path or URL")
    plot.add_argument("out", help="output image path")
    for command in (info, verify, compact, plot):
        add_storage_options_argument(command)
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
    from store.maintain import layout_info, layout_table
    from store.zarr_store import FeatureStore

    try:
        options = parse_storage_options(args.storage_options, "--storage-options")
    except ConfigError as e:
        print(f"tvr-store {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "compact":
        return _compact(args, options)
    try:
        store = FeatureStore.open(args.store, "r+" if getattr(args, "repair", False) else "r",
                                  storage_options=options)
    except StoreError as e:
        print(f"tvr-store {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "verify":
        return _verify(store, args.repair)
    if args.command == "info":
        try:
            mc = store.choices_info()
            if args.json:
                print(json.dumps({**summary(store, args.top), "layout": layout_info(store), "choices": mc},
                                 sort_keys=True))
            else:
                print(coverage_table(store, args.top) + "\n\n" + layout_table(layout_info(store))
                      + ("\n" + _choices_line(mc) if mc else ""))
        except StoreError as e:
            print(f"tvr-store info: {e}", file=sys.stderr)
            return 2
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


def _verify(store: object, repair: bool) -> int:
    """`tvr-store verify`: 0 when every feature is sound, 1 when problems were found (and, with --repair, reset)."""
    from store.maintain import repair as do_repair
    from store.maintain import verify

    reports = verify(store)
    bad = {n: r for n, r in reports.items() if not r.ok}
    for name, rep in reports.items():
        if rep.ok:
            print(f"{name}: ok")
            continue
        print(f"{name}: {len(rep.invalid_status)} invalid status code(s) {rep.invalid_status[:5]}, "
              f"{len(rep.lost)} OK row(s) without data {rep.lost[:5]}, {len(rep.damaged)} damaged block(s) "
              f"{rep.damaged[:2]}")
    if bad and repair:
        print(f"reset {do_repair(store, bad)} row(s) to PENDING; re-run tvr-extract to redo them")
    elif bad:
        print(f"run `tvr-store verify {store.url} --repair` to reset these rows to PENDING", file=sys.stderr)
    return 1 if bad else 0


def _choices_line(mc: dict[str, object]) -> str:
    """One line on the multiple-choice set for `tvr-store info`."""
    size = mc["bytes"]
    where = f"{mc['storage']}, {size / 2**20:.2f} MiB" if isinstance(size, int) else str(mc["storage"])
    return f"multiple choice: {mc['questions']} question(s) x {mc['options']} option(s) ({where})"


def _compact(args: argparse.Namespace, options: dict[str, object]) -> int:
    """`tvr-store compact SRC [DST]`."""
    from store.maintain import compact

    try:
        dst, kept = compact(args.src, args.dst, storage_options=options)
    except StoreError as e:
        print(f"tvr-store compact: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst} (schema v2, checked equal to the source)" + (f"; the original is kept at {kept}" if kept
                                                                        else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
