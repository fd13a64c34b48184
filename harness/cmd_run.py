"""`tandem run`: the main job in one command — parity, benchmark, report — on built-in defaults.

Runs `tandem parity --suite smoke`, then `tandem bench` on `cpu-smoke` (or `gpu` when a CUDA GPU
is visible), then `tandem report` over both results, and ends with the path of index.html. A
parity failure does not stop the benchmark or the report (people want to see what failed); it
decides the exit code. Not here: any measuring or comparing of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path


def add_parser(p) -> None:
    p.add_argument("--out", default="tandem-results", metavar="DIR",
                   help="results directory (parity/, bench/, report/ inside; default %(default)s)")
    p.add_argument("--parity-suite", default="smoke", metavar="SUITE",
                   help="parity suite (default %(default)s)")
    p.add_argument("--bench-suite", default=None, metavar="SUITE",
                   help="bench suite (default: gpu when a CUDA GPU is visible, else cpu-smoke)")
    p.add_argument("--skip-parity", action="store_true", help="benchmark and report only")
    p.add_argument("--skip-bench", action="store_true", help="parity and report only")


def _gpu_visible() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _step(title: str, argv: list[str]) -> int:
    from harness.cli import main as tandem_main

    print(f"\n=== {title}: tandem {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = tandem_main(argv)
    print(f"=== {title}: exit {rc} after {time.perf_counter() - t0:.1f} s", flush=True)
    return rc


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench_suite = args.bench_suite or ("gpu" if _gpu_visible() else "cpu-smoke")
    dirs, rc_parity, rc_bench = [], 0, 0
    if not args.skip_parity:
        rc_parity = _step("parity", ["parity", "--suite", args.parity_suite,
                                     "--out", str(out / "parity")])
        if rc_parity == 2:  # bad input: nothing to report on
            return 2
        dirs.append(out / "parity")
    if not args.skip_bench:
        rc_bench = _step("bench", ["bench", "--suite", bench_suite, "--out", str(out / "bench")])
        if rc_bench == 2:
            return 2
        dirs.append(out / "bench")
    if not dirs:
        print("tandem run: nothing to do (both --skip-parity and --skip-bench)", file=sys.stderr)
        return 2
    rc_report = _step("report", ["report", *map(str, dirs), "--out", str(out / "report")])
    index = (out / "report" / "index.html").resolve()
    verdict = "parity PASSED" if rc_parity == 0 else "parity FAILED" if rc_parity == 1 else \
        f"parity exit {rc_parity}"
    print(f"\n{verdict}; bench exit {rc_bench}; report exit {rc_report}")
    print(index)
    for rc in (rc_parity, rc_bench, rc_report):
        if rc:
            return rc
    return 0
