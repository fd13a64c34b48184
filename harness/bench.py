"""`tandem bench`: engine vs JAX on the same case, weights and tokens, timed in alternating
blocks (drift cancels in the ratio), warm-up excluded, JAX compile time apart; rows to
DIR/records.parquet, environment and per-case notes to DIR/run.json, traces of pipelined runs.
Not here: the JAX step (harness/bench_jax.py, a worker process), schedule theory, parity.
The parts: harness/bench_sides.py (running each side), harness/bench_case.py (one case: the
order and timing of the sides' blocks), harness/bench_records.py (rows, run.json, the table);
this module holds the suite loop and the command, and re-exports their names.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

from harness.bench_case import (JAX_FALLBACKS, ORDERS, SEPARATE_FRACTION, Settings,  # noqa: F401
                                _engine_asked_bytes, _loadavg, _param_table, _steps_for,
                                resolve_order, run_case)
from harness.bench_jax import _vm_kib, rss_high_water_bytes  # noqa: F401
from harness.bench_records import (RowMaker, _drop_case_rows, _fmt_si, _load_run_json,  # noqa: F401
                                   _now, _oom_cell, _table_notes, add_throughput_rows,
                                   format_table, summarize)
from harness.bench_sides import (MAX_STEPS_PER_BLOCK, RANK_SAMPLE_S, WORKER_TIMEOUT_S,  # noqa: F401
                                 BenchFailure, InProcessEngine, JaxOutOfMemory, JaxWorker,
                                 JobResult, RankMemory, _gpu_bytes_by_pid, _gpu_process_bytes,
                                 _is_cuda, _package_root, _reset_rss_high_water, _timed_bubble,
                                 engine_config, jax_memory_fraction, run_pipeline_job)
from harness.config import CaseConfig, SuiteConfig, case_id, load_suite
from harness.errors import ConfigError, TandemError
from harness.mps import MODES as MPS_MODES
from harness.records import RECORD_COLUMNS, append_parquet, to_frame, write_json

MIN_BLOCK_S = 0.3  # a timed block lasts at least this long (steps per block chosen to fit)
PIPELINE_TIMEOUT_S = 600.0  # one mpirun job

# How the numbers are taken; copied into run.json so a reader of the results knows.
METHOD = {
    "alternation": "per case: engine block, JAX block, engine block, ... (`repeats` pairs; "
                   "order = alternate, the default on CPU), or every engine block, the engine's "
                   "memory released, then every JAX block with JAX alone on the device (order = "
                   "separate, the default on GPU); speedup = engine tokens/s / JAX tokens/s of "
                   "the r-th block of each side, then median [p25, p75]",
    "out_of_memory": "a side that does not fit is a result: JAX's compiled step is checked "
                     "against 90% of the device's memory (compiled memory analysis) and "
                     "RESOURCE_EXHAUSTED is caught; then JAX is tried with jax.checkpoint per "
                     "block (remat) and with more micro-batches at the same global batch "
                     "(accum), each that fits its own labelled baseline; the engine retries with "
                     "twice the micro-batches until one fits; oom_asked_bytes rows say what the "
                     "step asked for",
    "block": "one repeat = a timed block of optimizer steps, at least case.steps and at least "
             "min_block_s long (in-process engine and JAX: steps are added until the block has "
             "lasted that long; a pipelined job: the step count comes from an untimed "
             "calibration job); its value is the median per-step time in the block",
    "warmup": "`warmup` untimed steps (at least one, for calibration) precede the first block "
              "on each side; in a pipelined job the first `warmup` steps of every job are dropped",
    "engine_timing": "one stage: wall time of Model.train_step (zero_grad, forward_backward per "
                     "micro-batch, AdamW) per step, in this process; on CUDA the ABI returns the "
                     "loss and norm to the host each step, so a block's per-step median holds "
                     "any queued tail; pipelined: step_s of the last rank, per step, from the "
                     "engine's own losses.csv",
    "compile_s": "JAX: wall time of the first call (trace + compile + one step) minus the median "
                 "of the steady warm-up steps",
    "jax_timing": "JAX runs in a worker process per case (python -m harness.bench_jax), started "
                  "with XLA_FLAGS=--xla_force_host_platform_device_count=P on CPU so the GPipe "
                  "baseline has P devices; jax.block_until_ready on every step before the clock "
                  "is read; batches are on the device before timing",
    "peak_mem_bytes": "engine one-stage: the engine's own allocation counter (libtandem "
                      "host_bytes on CPU, device_bytes on CUDA; it allocates everything at "
                      "build), with the bench process's VmHWM / nvidia-smi in run.json "
                      "(process_mem_bytes); engine CUDA pipelined: sum over ranks of the device "
                      "memory each held (nvidia-smi, sampled every 0.1 s), each rank's own "
                      "allocations in run.json (rank_device_bytes); engine CPU pipelined: sum "
                      "over ranks of each rank's VmHWM, "
                      "sampled every 0.1 s during the job; JAX on CPU: XLA's compiled memory "
                      "analysis of the step (arguments + outputs + temporaries - donated), the "
                      "worker's VmHWM where unknown (GPipe); JAX on GPU: allocator peak_bytes_in_use, summed over "
                      "devices",
    "mfu": "FLOPs per token (harness.flops, tandem 6N+6LTC; mfu_palm 6N+12LTC) x tokens/s / peak;"
           " CPU peak: the fp32 GEMM peak measured once per results directory (all ranks share "
           "the machine's cores); GPU: datasheet peak x the GPUs the ranks ran on (their rank<r>.json; "
           "ranks sharing one GPU: x 1)",
    "bubble": "engine: harness.timeline.measured_bubble per timed step, median per job; theory "
              "bubble: harness.schedule.theoretical_bubble (equal stage times) as a share of the "
              "step; theory bubble_sim: harness.schedule.simulate replaying the schedule with the "
              "job's own mean F/B/W durations per virtual stage (harness.bench_sides."
              "stage_durations; no communication cost)",
}

# ---- case selection ----------------------------------------------------------------------------


def select_cases(suite: SuiteConfig, names: list[str] | None) -> list[CaseConfig]:
    """The suite's cases, or those named: an exact case name, or a sweep's base name (every
    point "base/axis=value,..." of it). Unknown names raise ConfigError."""
    if not names:
        return list(suite.cases)
    chosen: list[CaseConfig] = []
    for name in names:
        hits = [c for c in suite.cases if c.name == name or c.name.split("/", 1)[0] == name]
        if not hits:
            raise ConfigError(f"--case {name!r}: suite {suite.name!r} has no such case "
                              f"(cases: {', '.join(c.name for c in suite.cases)})")
        chosen += [c for c in hits if c not in chosen]
    return [c for c in suite.cases if c in chosen]  # suite order



# ---- the command -------------------------------------------------------------------------------


def _count(flag: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} = {value!r}: must be an integer >= {minimum}")
    return value


def bench_suite(suite_arg: str, out: Path | None = None, *, repeats: int | None = None,
                warmup: int | None = None, cases: list[str] | None = None,
                threads: int | None = None, jax: bool = True, min_block_s: float = MIN_BLOCK_S,
                timeout: float = PIPELINE_TIMEOUT_S, fresh: bool = False,
                command: str = "", order: str = "auto", mps: str = "auto") -> int:
    """Run (or resume) a bench into `out`; returns the exit code (0, or 3 when a case failed).
    Bad input raises ConfigError/DataError (exit 2)."""
    from tqdm import tqdm

    from harness.envinfo import collect_env, peak_for

    suite = load_suite(suite_arg)
    settings = Settings(
        repeats=_count("--repeats" if repeats is not None else "bench.repeats",
                       suite.bench.repeats if repeats is None else repeats, 1),
        warmup=_count("--warmup" if warmup is not None else "bench.warmup",
                      suite.bench.warmup if warmup is None else warmup, 0),
        threads=_count("--threads", threads if threads is not None else (os.cpu_count() or 1), 1),
        jax=jax, min_block_s=float(min_block_s), timeout=float(timeout), order=order, mps=mps)
    if mps not in MPS_MODES:
        raise ConfigError(f"--mps = {mps!r}: expected one of {', '.join(MPS_MODES)}")
    if order not in ORDERS:
        raise ConfigError(f"--order = {order!r}: expected one of {', '.join(ORDERS)}")
    if not (math.isfinite(settings.min_block_s) and settings.min_block_s >= 0):
        raise ConfigError(f"--min-time = {min_block_s!r}: must be a number >= 0")
    chosen = select_cases(suite, cases)
    out = Path(out) if out is not None else Path("tandem-results") / f"bench-{suite.name}"
    out.mkdir(parents=True, exist_ok=True)
    run_path, rec_path = out / "run.json", out / "records.parquet"
    if fresh:
        for f in (run_path, rec_path):
            f.unlink(missing_ok=True)
        for d in ("traces", "timelines", "work"):
            shutil.rmtree(out / d, ignore_errors=True)
    run = _load_run_json(run_path)
    old_suite = (run.get("suite") or {}).get("name")
    if old_suite not in (None, suite.name):
        raise ConfigError(f"--out {out}: holds results of suite {old_suite!r}, not "
                          f"{suite.name!r}. HINT: give another --out to keep them apart")

    env = collect_env()
    old_env = run.get("env") or {}
    if old_env.get("hostname") == env["hostname"]:
        for key in ("cpu_gemm_peak", "gpu_gemm_peak"):  # one peak per results directory
            if old_env.get(key):
                env[key] = old_env[key]
    run.update({
        "machine": f"{env['hostname']} ({env['platform']})",
        "cpu": f"{env['cpu_model']} ({env['cpu_count']} cores)",
        "gpu": env.get("gpu_name"),
        "versions": {k: env[k] for k in ("python", "numpy", "jax", "jaxlib", "engine")},
        "commit": env["commit"], "timestamp": env["timestamp"], "env": env,
        "command": command, "commands": run.get("commands", []) + [command],
        "suite": {"name": suite.name, "description": suite.description,
                  "path": str(suite.path) if suite.path else None},
        "bench": {"repeats": settings.repeats, "warmup": settings.warmup,
                  "threads": settings.threads, "jax": settings.jax,
                  "min_block_s": settings.min_block_s, "order": settings.order,
                  "method": METHOD},
    })
    run.setdefault("cases", {})
    run.setdefault("peaks", {})

    def peak_of(case: CaseConfig, devices: int | None = None) -> tuple[float, str]:
        """Per-device peak for the case's backend and dtype (measured once, kept in env and
        run.json), times the GPUs a pipelined job ran on (`devices`, from the ranks' own
        descriptions; the stage count when unknown)."""
        if _is_cuda(case):
            value, source = peak_for("cuda", case.dtype, env, measure=False)
            n = devices if devices else case.pipeline.stages
            if n > 1 and value > 0:
                value, source = value * n, f"{source} x {n} devices"
        else:
            value, source = peak_for("cpu", case.dtype, env)
        if value > 0:
            run["peaks"][f"{case.backend} {case.dtype}"] = {"flops": value, "source": source}
        return value, source

    # the commit hash alone: a dirty flag would not tell two sets of local edits apart either
    commit = env["commit"]

    def finished(c: CaseConfig) -> bool:
        """Done in an earlier run of the same code (resume); rows of another commit are
        measured again so that one results directory describes one version."""
        entry = run["cases"].get(case_id(c), {})
        return entry.get("status") == "done" and entry.get("commit") == commit

    todo = [c for c in chosen if not finished(c)]
    if any(not _is_cuda(c) for c in todo):
        peak_of(next(c for c in todo if not _is_cuda(c)))  # measure now, on a quiet machine
    write_json(run_path, run)

    failed = []
    with tqdm(total=len(chosen) * settings.repeats, file=sys.stderr, unit="repeat",
              dynamic_ncols=True) as pbar:
        for case in chosen:
            name = case_id(case)
            if case not in todo:
                pbar.write(f"{name}: done in an earlier run of commit {commit[:12]}, skipped "
                           "(resume; --fresh measures again)", file=sys.stderr)
                pbar.update(settings.repeats)
                continue
            _drop_case_rows(rec_path, suite.name, name)
            old = run["cases"].get(name, {})
            if old.get("status") == "done":
                pbar.write(f"{name}: results of commit {str(old.get('commit'))[:12]} replaced "
                           f"(now {commit[:12]})", file=sys.stderr)
            entry = run["cases"][name] = {"status": "running", "started": _now(),
                                          "commit": commit}
            write_json(run_path, run)
            done_before = pbar.n
            try:
                rows = run_case(case, out, settings, env, peak_of, pbar, suite.name, entry)
            except Exception as exc:  # noqa: BLE001 - one failed case must not end the sweep
                entry.update(status="failed", finished=_now())
                if isinstance(exc, TandemError):
                    entry["error"] = str(exc)
                else:  # a bug rather than a failing side: keep the traceback
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    entry["traceback"] = traceback.format_exc()
                    traceback.print_exc(file=sys.stderr)
                msg = entry["error"]
                pbar.write(f"{name}: FAILED: {msg}", file=sys.stderr)
                failed.append(name)
                pbar.update(done_before + settings.repeats - pbar.n)
            else:
                append_parquet(rec_path, to_frame(rows, RECORD_COLUMNS))
                entry.update(status="done", finished=_now())
            write_json(run_path, run)

    import pandas as pd

    records = pd.read_parquet(rec_path) if rec_path.exists() else pd.DataFrame(
        columns=RECORD_COLUMNS)
    if len(records):
        records = records[records["suite"] == suite.name]
    print(f"tandem bench: suite {suite.name}, {settings.repeats} repeats x (engine, JAX), "
          f"warm-up {settings.warmup}; results in {out}")
    print(format_table(records, chosen, run))
    for line in _table_notes(chosen, run, records):
        print(f"  {line}")
    for line in _machine_notes(chosen, run):
        print(f"  {line}")
    peaks = "; ".join(f"{k}: {v['flops'] / 1e9:.1f} GFLOP/s ({v['source']})"
                      for k, v in run["peaks"].items())
    if peaks:
        print(f"  MFU peak: {peaks}")
    return 3 if failed else 0


def _machine_notes(chosen: list[CaseConfig], run: dict) -> list[str]:
    """What else ran on the CPU (measured at each case's start and end, this process's own
    threads excluded), and how the in-process engine's OpenMP threads waited."""
    ncpu = os.cpu_count() or 1
    entries = [run["cases"].get(case_id(c), {}) for c in chosen]
    lines = []
    busy = [v for e in entries for k in ("busy_elsewhere_start", "busy_elsewhere_end")
            if (v := e.get(k)) is not None]
    loads = [v for e in entries for k in ("loadavg_start", "loadavg_end")
             if (v := e.get(k)) is not None]
    if busy and max(busy) > 0.25:
        lines.append(f"other processes used up to {max(busy):.2f} of {ncpu} cores while cases "
                     "started or ended: compare the ratios (measured in alternation), not "
                     "absolute figures")
    elif not busy and loads and max(loads) > 0.25 * ncpu:
        lines.append(f"machine load during the run up to {max(loads):.2f} on {ncpu} cores "
                     "(this run's own work included): compare the ratios (measured in "
                     "alternation), not absolute figures")
    waits = {(w.get("GOMP_SPINCOUNT"), w.get("OMP_WAIT_POLICY"), w.get("libgomp_preloaded"))
             for e in entries if (w := (e.get("engine") or {}).get("omp_wait"))}
    for spin, policy, preloaded in sorted(waits, key=str):
        how = (f"GOMP_SPINCOUNT={spin} (a short spin between parallel regions)" if spin
               else "no spin (passive: cores were busy elsewhere when libgomp loaded)")
        if preloaded:
            how += "; libgomp was loaded before the harness could choose"
        lines.append(f"engine OpenMP threads: OMP_WAIT_POLICY={policy}, {how}")
    return lines


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, metavar="NAME|PATH",
                   help="a built-in suite name (cpu-smoke, cpu-perf, ...) or a .toml file")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="results directory (default tandem-results/bench-SUITE); a directory "
                        "holding an earlier run of the same suite is resumed: cases finished "
                        "on the same commit are skipped")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="timed (engine, JAX) pairs per case (default: the suite's [bench])")
    p.add_argument("--warmup", type=int, metavar="N",
                   help="untimed warm-up steps per side (default: the suite's [bench])")
    p.add_argument("--case", action="append", nargs="+", metavar="NAME",
                   help="run only these cases (a sweep's base name selects all its points)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="engine threads (default: all cores); pipelined ranks get N / stages")
    p.add_argument("--no-jax", action="store_true", help="time the engine only")
    p.add_argument("--min-time", type=float, default=MIN_BLOCK_S, metavar="S",
                   help=f"shortest timed block in seconds (default {MIN_BLOCK_S}); a block is "
                        "at least the case's `steps` steps")
    p.add_argument("--order", choices=ORDERS, default="auto",
                   help="alternate: engine block, JAX block, ... (drift cancels in the ratio); "
                        "separate: every engine block, then the engine's memory released and "
                        "every JAX block alone (each side gets the whole GPU); auto (default): "
                        "alternate on CPU, separate on GPU")
    p.add_argument("--mps", choices=MPS_MODES, default="auto",
                   help="CUDA MPS for GPU pipeline ranks sharing a GPU: auto (default) starts a "
                        "private MPS daemon for each job when none is running and runs "
                        "time-sliced when it cannot; on: fail when it cannot; off: time-sliced")
    p.add_argument("--fresh", action="store_true",
                   help="discard earlier results in DIR instead of resuming")
    p.add_argument("--timeout", type=float, default=PIPELINE_TIMEOUT_S, metavar="S",
                   help=f"limit for one mpirun job (default {PIPELINE_TIMEOUT_S:.0f} s)")


def run(args: argparse.Namespace) -> int:
    names = [n for group in (args.case or []) for n in group]
    command = "tandem bench " + " ".join(shlex.quote(a) for a in _argv_of(args))
    t0 = time.perf_counter()
    rc = bench_suite(args.suite, args.out, repeats=args.repeats, warmup=args.warmup,
                   cases=names or None, threads=args.threads, jax=not args.no_jax,
                   min_block_s=args.min_time, timeout=args.timeout, fresh=args.fresh,
                   command=command, order=args.order, mps=args.mps)
    print(f"  wall time {time.perf_counter() - t0:.1f} s")
    return rc


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The command line, rebuilt from `args` (the same whether started as `tandem` or from
    Python through cli.main)."""
    out = ["--suite", str(args.suite)]
    if args.out is not None:
        out += ["--out", str(args.out)]
    for flag in ("repeats", "warmup", "threads"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    for group in args.case or []:
        out += ["--case", *group]
    if args.no_jax:
        out.append("--no-jax")
    if args.fresh:
        out.append("--fresh")
    if args.min_time != MIN_BLOCK_S:
        out += ["--min-time", str(args.min_time)]
    if args.timeout != PIPELINE_TIMEOUT_S:
        out += ["--timeout", str(args.timeout)]
    if getattr(args, "order", "auto") != "auto":
        out += ["--order", args.order]
    if getattr(args, "mps", "auto") != "auto":
        out += ["--mps", args.mps]
    return out


__all__ = ["bench_suite", "select_cases", "summarize", "format_table", "add_parser", "run",
           "JaxWorker", "InProcessEngine", "RankMemory", "BenchFailure", "METHOD"]
