"""`tandem parity`: proves, tensor by tensor, that the engine computes what the JAX reference
computes and that pipelining does not change the result; exits non-zero on any mismatch.
Not here: the tolerances (harness/tolerances.py), the op-tier inputs (harness/parity_ops.py),
launching ranks (harness/pipeline.py), or any timing (`tandem bench`). Its parts: the inputs
(harness/parity_inputs.py), the tiers (harness/parity_tiers.py, with AdamW's conditioning in
harness/parity_adamw.py), the rows and their printing (harness/parity_rows.py); the names they
define are importable from here too.

Per case of a suite, one seeded weights file and one pair of token shards feed both sides (each
side reads them with its own reader), then the tiers run:
  op          every kernel (td_op_*) and the stage passes (encoder, one block, head) vs
              jax.vjp of reference.ops, on random inputs
  model       logits, loss and every gradient by name after one forward + backward at step 0
  trajectory  K AdamW steps with the case's micro-batches: every step's loss, final parameters
  schedule    the pipelined engine vs the one-stage, no-micro-batching engine control: every
              step's loss and the step-0 gradients; final parameters vs the one-stage engine
              with the same micro-batches (schedule_tier says why)
Output: a per-tensor table on stdout; parity.parquet, parity_summary.json, losses.parquet and
run.json in --out. Exit 0 when every comparison passes, 1 on a mismatch, 2 on a bad suite or
option, 3 when the engine or a rank failed.
"""

from __future__ import annotations

import dataclasses

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import pandas as pd

from harness import tolerances as tol
from harness.config import CaseConfig, SuiteConfig, case_slug, load_suite
from harness.engine import Model, version as engine_version
from harness.errors import ConfigError, DataError, EngineError, RankFailure
from harness.parity_adamw import AdamScale, _param_rows, _reference_trajectory  # noqa: F401
from harness.parity_inputs import CaseInputs, engine_config, prepare, prepare_ops_only  # noqa: F401
from harness.parity_inputs import _jax_params, _load_engine, _ref_config, _ref_model  # noqa: F401
from harness.parity_rows import TEXT_CURVE_ROWS, Collector, TierResult  # noqa: F401
from harness.parity_rows import _fmt, _verdict, print_case_table, print_text_curve  # noqa: F401
from harness.parity_rows import tier_summary
from harness.parity_tiers import TIER_FUNCS, case_tiers, model_tier, op_tier  # noqa: F401
from harness.parity_tiers import EngineRun, _engine_run, _pipeline_runner  # noqa: F401
from harness.parity_tiers import schedule_tier, trajectory_tier  # noqa: F401
from harness.records import PARITY_COLUMNS, ParityRow, to_frame, write_json

BACKENDS = ("cpu", "cuda")
WORST_SHOWN = 3  # passing rows printed per case and tier (every failure is printed)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, metavar="NAME|PATH",
                   help="a built-in suite name (smoke, full, ...) or a path to a suite .toml")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="results directory (default ./tandem-results/parity-<suite>)")
    p.add_argument("--backend", choices=BACKENDS, default="cpu",
                   help="engine backend to check: cpu (default), or cuda (a libtandem built "
                        "with CUDA: one-stage cases move to the GPU, fp32 against JAX fp32 "
                        "on the same GPU)")
    p.add_argument("--case", action="append", metavar="NAME", default=None,
                   help="run only this case (repeatable)")
    p.add_argument("--tier", action="append", choices=tol.TIERS, default=None,
                   help="run only this tier (repeatable; default: the case's tiers, plus "
                        "schedule for pipelined cases)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="engine OpenMP threads (default 1: parity checks maths, and results "
                        "are deterministic for a given thread count)")
    p.add_argument("--worst", type=int, default=WORST_SHOWN, metavar="N",
                   help=f"passing rows shown per case and tier (default {WORST_SHOWN}; "
                        "failures are always shown)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only failures, skipped tiers and the verdict")


# ---- the command -------------------------------------------------------------------------------


def _select_cases(suite: SuiteConfig, names: list[str] | None, backend: str
                  ) -> tuple[list[CaseConfig], list[tuple[str, str]]]:
    if names:  # a name selects that case, or every point of the sweep it names ("base/...")
        cases = []
        for n in names:
            points = [c for c in suite.cases if c.name.startswith(n + "/")]
            cases += points or [suite.case(n)]  # suite.case raises ConfigError naming the cases
    else:
        cases = list(suite.cases)
    chosen, skipped = [], []
    for c in cases:
        if c.backend == backend:
            chosen.append(c)
        elif c.dtype == "bf16" and backend == "cpu":
            skipped.append((c.name, "bf16 needs a device backend"))
        else:  # --backend moves a case, pipelined or not, to that backend (fp32 stays fp32):
            # the schedule tier then runs CUDA ranks against the one-stage CUDA control
            chosen.append(dataclasses.replace(c, backend=backend))
    if not chosen:
        raise ConfigError(f"--backend {backend}: no case of suite {suite.name!r} runs on this "
                          f"backend (cases: {', '.join(f'{c.name} ({c.backend})' for c in cases)})")
    return chosen, skipped


def _check_backend(backend: str) -> None:
    """A clear error up front when libtandem was built without the requested backend."""
    if backend == "cpu":
        return
    try:
        Model(n_layer=1, n_embd=8, n_head=1, vocab_size=8, n_positions=2, seq_len=2,
              batch_size=1, backend=backend).close()
    except EngineError as exc:
        raise ConfigError(f"--backend {backend}: not built in this libtandem "
                          f"('{engine_version()}'): {exc}") from None


# Tiers that only exist on the CPU: td_op_* and the per-op stage passes run the CPU kernels. (The
# schedule tier runs on any backend: tandem-engine ranks with CUDA stages against the one-stage
# CUDA engine.)
CPU_ONLY_TIERS = {"op": "the op tier runs the CPU kernels (td_op_*, stage passes)"}


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    suite = load_suite(args.suite)  # ConfigError -> exit 2 through the CLI
    if args.threads < 0:
        raise ConfigError(f"--threads = {args.threads}: must be >= 0 (0 = OpenMP default)")
    _check_backend(args.backend)
    cases, skipped_cases = _select_cases(suite, args.case, args.backend)
    out = Path(args.out) if args.out else Path("tandem-results") / f"parity-{suite.name}"
    out.mkdir(parents=True, exist_ok=True)

    from reference import set_precision

    set_precision()  # before any JAX compute: fp32 matmuls stay fp32
    try:
        from harness.envinfo import collect_env
        env = collect_env()
    except ImportError:  # run.json then records the run without the machine
        env = {}
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = str(env.get("commit", ""))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    say(f"tandem parity: suite {suite.name} ({len(cases)} case{'s' * (len(cases) != 1)}, "
        f"backend {args.backend}, engine {engine_version()}) -> {out}")
    for name, why in skipped_cases:
        print(f"  skipped case {name}: {why}", flush=True)

    all_rows: list[ParityRow] = []
    losses: list[tuple] = []
    summary_cases: dict[str, dict] = {}
    any_error = False
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        col = Collector(suite.name, case, args.backend, commit, stamp)
        results: dict[str, TierResult] = {}
        case_error = None
        try:
            workdir = out / "cases" / case_slug(case)
            tiers = case_tiers(case, args.tier)
            if case.model.family == "llama" and tiers == ["op"]:
                inp = prepare_ops_only(case, workdir)
            else:
                inp = prepare(case, workdir, args.threads)
            for tier in tiers:
                fn = TIER_FUNCS[tier]
                if case.backend != "cpu" and tier in CPU_ONLY_TIERS:
                    results[tier] = TierResult(skipped=f"{CPU_ONLY_TIERS[tier]}, not "
                                                       f"{case.backend}")
                    continue
                try:
                    if tier in ("trajectory", "schedule"):
                        results[tier] = fn(inp, col, args.threads, losses)
                    else:
                        results[tier] = fn(inp, col, args.threads)
                except (EngineError, RankFailure, DataError) as exc:
                    results[tier] = TierResult(error=f"{type(exc).__name__}: {exc}")
        except (EngineError, DataError) as exc:
            case_error = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - t0
        errored = case_error is not None or any(r.error for r in results.values())
        any_error |= errored
        passed = not errored and all(r.passed for r in results.values())
        for r in results.values():
            all_rows.extend(r.rows)
        counts = ", ".join(
            f"{t} skipped" if r.skipped else f"{t} {sum(x.passed for x in r.rows)}/{len(r.rows)}"
            for t, r in results.items())
        verdict = "ERROR" if errored else "PASS" if passed else "FAIL"
        if not (args.quiet and passed):
            print(f"[{i}/{len(cases)}] {case.name:<24} {verdict:<5} {counts}  "
                  f"({elapsed:.1f} s)", flush=True)
        if case_error:
            print(f"  error: {case_error}", flush=True)
        print_case_table(case.name, results, args.worst, args.quiet)
        if case.data == "text" and not args.quiet:
            print_text_curve(case.name, losses)
        summary_cases[case.name] = {
            "passed": passed, "error": case_error, "elapsed_s": round(elapsed, 3),
            "data": case.data, "dtype": case.dtype,
            "tiers": {t: tier_summary(r) for t, r in results.items()},
        }

    failed = sum(1 for c in summary_cases.values() if not c["passed"])
    passed_all = failed == 0
    unchecked = skipped_tiers(summary_cases)
    code = 3 if any_error else 0 if passed_all else 1
    frame = to_frame(all_rows, PARITY_COLUMNS)
    frame.to_parquet(out / "parity.parquet", index=False)
    pd.DataFrame(losses, columns=["case", "side", "step", "loss"]).to_parquet(
        out / "losses.parquet", index=False)
    write_json(out / "parity_summary.json", {
        "suite": suite.name, "passed": passed_all, "exit_code": code, "backend": args.backend,
        "compared": len(all_rows), "failed_rows": int(sum(not r.passed for r in all_rows)),
        "cases": summary_cases, "skipped_cases": dict(skipped_cases),
        "skipped_tiers": unchecked,
    })
    write_json(out / "run.json", {
        **env, "argv": list(sys.argv),
        "suite": suite.name, "suite_path": str(suite.path) if suite.path else None,
        "backend": args.backend, "threads": args.threads, "tiers": args.tier,
        "cases": [c.name for c in cases], "elapsed_s": round(time.perf_counter() - t_start, 3),
        "tolerances": tol.policy_table(),
    })
    bad = [r for r in all_rows if not r.passed]
    n_cases = f"{len(cases)} case{'s' * (len(cases) != 1)}"
    if passed_all:
        print(f"parity: PASS ({len(all_rows)} comparisons in {n_cases}) -> {out}")
    if unchecked:  # a PASS says nothing about a tier that did not run: say which, and why
        n = sum(map(len, unchecked.values()))
        print(f"parity: NOT CHECKED: {n} tier{'s' * (n != 1)} skipped, by reason:", flush=True)
        for why, where in unchecked.items():
            print(f"  {', '.join(where)}: {why}", flush=True)
    if not passed_all:
        print(f"parity: {'ERROR' if any_error else 'FAIL'}: {failed} of {n_cases}, "
              f"{len(bad)} of {len(all_rows)} comparisons failed -> {out}")
    return code


def skipped_tiers(summary_cases: dict[str, dict]) -> dict[str, list[str]]:
    """The tiers that did not run, "case/tier" grouped by the reason given (in case order)."""
    out: dict[str, list[str]] = {}
    for name, c in summary_cases.items():
        for tier, t in c["tiers"].items():
            if t.get("skipped"):
                out.setdefault(t["skipped"], []).append(f"{name}/{tier}")
    return out


__all__ = ["add_parser", "run", "skipped_tiers", "prepare", "engine_config", "case_tiers",
           "Collector", "TierResult", "op_tier", "model_tier", "trajectory_tier",
           "schedule_tier"]
