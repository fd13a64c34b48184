"""Where a CPU training step's time goes: the engine's per-phase profile for one suite case.

Builds the case's one-stage engine (seeded weights and tokens, the bench's own configuration),
runs warm-up steps, then `--steps` timed steps with the engine key profile = 1, and prints a
Markdown table: phase, milliseconds per step, share of the step, calls per step. "unaccounted"
is the step's time minus the phases (the global gradient norm, the binding, zeroing).
`--clock cpu` (engine key profile = 2) counts the calling thread's CPU time instead of wall
time: on a machine others load it moves far less, and with `--threads 1` it is all the work.
Not a benchmark against JAX (that is `tandem bench`); the load average is printed with the table.

    python3 tools/cpu_profile.py --suite cpu-smoke --case tiny --steps 200
    python3 tools/cpu_profile.py --suite cpu-perf --case small --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from harness.bench import engine_config  # noqa: E402
from harness.config import load_suite  # noqa: E402
from harness.engine import Model  # noqa: E402
from harness.init import init_params  # noqa: E402


def profile_case(suite: str, case_name: str, steps: int, warmup: int, threads: int,
                 clock: str = "wall"):
    case = load_suite(suite).case(case_name)
    model = Model(**engine_config(case, threads, batch_size=case.batch_size),
                  profile=2 if clock == "cpu" else 1)
    now = time.thread_time if clock == "cpu" else time.perf_counter
    model.set_params(init_params(model.table, case.model.n_layer, case.seed))
    rng = np.random.default_rng(case.seed)
    shape = (case.batch_size, case.seq_len)
    x = rng.integers(0, case.model.vocab_size, shape, dtype=np.int32)
    y = rng.integers(0, case.model.vocab_size, shape, dtype=np.int32)
    for _ in range(warmup):
        model.train_step(x, y)
    model.profile_reset()
    t0 = now()
    for _ in range(steps):
        model.train_step(x, y)
    wall = (now() - t0) / steps
    table = model.profile()
    model.close()
    return case, wall, table


def render(case, wall: float, table: dict, steps: int, threads: int, clock: str = "wall") -> str:
    rows = sorted(((s / steps, n / steps, k) for k, (s, n) in table.items() if n),
                  reverse=True)
    accounted = sum(r[0] for r in rows)
    load = os.getloadavg()
    lines = [f"case `{case.name}` (L{case.model.n_layer} C{case.model.n_embd} "
             f"NH{case.model.n_head} V{case.model.vocab_size} T{case.seq_len} "
             f"B{case.batch_size}), {threads} thread(s), {steps} steps, {clock} clock: "
             f"{wall * 1e3:.3f} ms/step; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
             "", "| phase | ms/step | share | calls/step |", "|---|---:|---:|---:|"]
    for s, n, k in rows:
        lines.append(f"| {k} | {s * 1e3:.3f} | {100 * s / wall:.1f}% | {n:g} |")
    rest = wall - accounted
    lines.append(f"| unaccounted | {rest * 1e3:.3f} | {100 * rest / wall:.1f}% | |")
    lines.append(f"| **step** | **{wall * 1e3:.3f}** | 100% | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cpu-smoke")
    p.add_argument("--case", default="tiny")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or the calling thread's CPU time (profile = 2)")
    a = p.parse_args(argv)
    case, wall, table = profile_case(a.suite, a.case, a.steps, a.warmup, a.threads, a.clock)
    print(render(case, wall, table, a.steps, a.threads, a.clock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
