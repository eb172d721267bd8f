"""The ``mbq`` command line.

Exit codes: 0 success, 2 bad usage or input (a clear one-line message on
stderr), 1 an internal failure (with the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import MBQError

__all__ = ["main", "UsageError"]


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def _cmd_tour(args) -> int:
    from .tour import run_tour

    report = run_tour(Path(args.out), quick=args.quick, progress=not args.no_progress)
    print(f"report: {Path(args.out) / 'report.md'} and report.json ({len(report)} sections)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mbq",
        description="MoBiQuant reference implementation: quantize once, run at any average precision.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("tour", help="the main job on the bundled data, end to end on CPU", description=(
        "FP perplexity, static per-bit baselines, MoBiQuant calibration, elastic sweep, plots; "
        "writes OUT/report.json and OUT/report.md."))
    t.add_argument("--out", default="runs/tour", help="output folder (default: runs/tour)")
    t.add_argument("--quick", action="store_true", help="fewer evaluation windows (a smoke run, ~1 min)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_tour)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, MBQError, FileNotFoundError) as exc:
        # our errors carry "what is wrong + how to fix it"; anything else is a bug (exit 1, traceback)
        print(f"mbq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
