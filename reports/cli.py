"""`tandem report`: argument parsing and dispatch to build_report / compare.

    tandem report DIR... --out OUT [--screenshot]
    tandem report --compare BASE NEW --out OUT [--threshold 1.10]

Exit status: 0 written; 1 --compare found a regression or --screenshot's browser check failed
(reports/browser_check.py); 2 bad input (DataError/ConfigError, mapped by harness.cli) or no
browser. What it is not: report logic — that lives in build.py and compare.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import ConfigError


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                   help="results directories (records.parquet, parity.parquet, run.json, ...)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT",
                   help="report directory to write (index.html, report.md, figures/, traces/)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BASE", "NEW"),
                   help="before/after report of two results directories instead")
    p.add_argument("--threshold", type=float, default=1.10, metavar="X",
                   help="with --compare: a metric worse by more than X times in its bad "
                        "direction is a regression (default 1.10)")
    p.add_argument("--screenshot", action="store_true",
                   help="also render OUT/screenshot.png with headless Chromium and check the "
                        "page: no console error, every figure loaded, nothing blank (exit 1)")


def run(args: argparse.Namespace) -> int:
    from reports.build import build_report
    from reports.compare import compare, count_regressions

    status = 0
    if args.compare:
        if args.dirs:
            raise ConfigError("give either results directories or --compare BASE NEW, not both "
                              f"(got DIR {', '.join(map(str, args.dirs))})")
        index = compare(args.compare[0], args.compare[1], args.out, threshold=args.threshold)
        n = count_regressions(args.out)
        if n:
            print(f"tandem report: {n} regression(s) beyond {args.threshold:g}x "
                  f"(see {index})", file=sys.stderr)
            status = 1
    else:
        if not args.dirs:
            raise ConfigError("no results directory given; usage: tandem report DIR... --out OUT "
                              "or tandem report --compare BASE NEW --out OUT")
        index = build_report(args.dirs, args.out)
    if args.screenshot:
        from reports.screenshot import screenshot

        print(screenshot(index, Path(args.out) / "screenshot.png"))
    print(index)
    return status
