"""`tandem schedule`: print a pipeline schedule, its bubble and its peak in-flight micro-batches.

Generates, validates and simulates a schedule with `harness.schedule`, then prints a chart and
the numbers (or one JSON object with --json); --csv also writes the executor's CSV. It runs no
engine and measures nothing (measured bubbles come from `harness.timeline`).
"""

from __future__ import annotations

import argparse
import json
import math

from harness import schedule as sched
from harness.errors import ConfigError


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", required=True, choices=sched.NAMES, help="schedule to generate")
    p.add_argument("--stages", "-P", type=int, required=True, metavar="P",
                   help="pipeline ranks P")
    p.add_argument("--microbatches", "-M", type=int, required=True, metavar="M",
                   help="micro-batches per step M")
    p.add_argument("--chunks", "-V", type=int, default=1, metavar="V",
                   help="model chunks per rank (interleaved only; default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--csv", metavar="PATH", help="also write the schedule CSV the engine reads")
    p.add_argument("--f", type=float, default=1.0, help="forward time per stage-chunk (default 1)")
    p.add_argument("--b", type=float, default=1.0,
                   help="input-gradient time per stage-chunk (default 1)")
    p.add_argument("--w", type=float, default=1.0,
                   help="weight-gradient time per stage-chunk (default 1); BW costs b + w")
    p.add_argument("--comm", type=float, default=0.0,
                   help="latency of a message between ranks in the simulation (default 0)")


def _check(args: argparse.Namespace) -> None:
    for flag, value in (("--stages", args.stages), ("--microbatches", args.microbatches),
                        ("--chunks", args.chunks)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.chunks != 1 and args.schedule != "interleaved":
        raise ConfigError(f"--chunks {args.chunks} only applies to --schedule interleaved "
                          f"(got --schedule {args.schedule}); drop --chunks or use interleaved")
    if args.schedule == "interleaved" and args.microbatches % args.stages != 0:
        raise ConfigError(f"--schedule interleaved needs --microbatches to be a multiple of "
                          f"--stages: M={args.microbatches} % P={args.stages} = "
                          f"{args.microbatches % args.stages}")
    for flag in ("f", "b", "w", "comm"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{flag} must be finite and >= 0, got {value}")
    if args.f + args.b + args.w <= 0:
        raise ConfigError("--f, --b and --w are all 0: nothing to simulate")


def run(args: argparse.Namespace) -> int:
    _check(args)
    P, M, V = args.stages, args.microbatches, args.chunks
    s = sched.generate(args.schedule, P, M, V)  # ScheduleError is a ConfigError: exit 2
    sched.validate(s)
    sim = sched.simulate(s, args.f, args.b, args.w, args.comm)
    theory = sched.theoretical_bubble(args.schedule, P, M, V, args.f, args.b, args.w)
    if args.csv:
        sched.to_csv(s, args.csv)
    peak_mb = [p / V for p in sim.peak_in_flight]

    if args.json:
        print(json.dumps({
            "schedule": args.schedule, "ranks": P, "microbatches": M, "chunks": V,
            "stages": s.stages,
            "durations": {"f": args.f, "b": args.b, "w": args.w, "comm": args.comm},
            "theoretical_bubble": {"of_compute": theory.of_compute, "of_step": theory.of_step,
                                   "formula": theory.formula},
            "simulated": {"makespan": sim.makespan, "bubble_of_step": sim.bubble,
                          "bubble_of_compute": sim.bubble_of_compute, "busy": list(sim.busy)},
            "peak_in_flight_activation_sets": list(sim.peak_in_flight),
            "peak_in_flight_microbatches": peak_mb,
            "actions": [[[a.kind, a.stage, a.microbatch] for a in acts] for acts in s.actions],
            "csv": args.csv,
        }))
        return 0

    print(f"schedule {args.schedule}: P={P} ranks, M={M} micro-batches, V={V} chunk(s) per rank "
          f"({s.stages} virtual stages)")
    print(sched.chart(s, sim))
    print()
    note = "" if args.schedule != "zb-h1" or M >= P else " (the formula assumes M >= P)"
    print(f"theoretical bubble: {theory.of_compute:.4f} of ideal compute = idle / busy time, "
          f"{theory.formula}{note}")
    print(f"                    {theory.of_step:.4f} of the step = idle share of P x step time")
    print(f"simulated bubble (f={args.f:g} b={args.b:g} w={args.w:g} comm={args.comm:g}, "
          f"makespan {sim.makespan:g}): {sim.bubble_of_compute:.4f} of ideal compute, "
          f"{sim.bubble:.4f} of the step")
    if V == 1:
        peaks = ", ".join(f"r{r} {p}" for r, p in enumerate(sim.peak_in_flight))
        print(f"peak in-flight micro-batches per rank: {peaks}")
    else:
        peaks = ", ".join(f"r{r} {p} ({q:g})" for r, (p, q) in enumerate(zip(sim.peak_in_flight,
                                                                               peak_mb)))
        print(f"peak in-flight activation sets per rank (in micro-batches, / V): {peaks}")
    if args.csv:
        print(f"wrote {args.csv}")
    return 0
