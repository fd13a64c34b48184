"""One case of `tandem bench`, end to end (`run_case`): data and weights, which engine runs
(in-process, mpirun, or none) and its out-of-memory retries, the JAX variants and their
fallbacks, warm-up and calibration, the timed blocks in the order of the sides (`resolve_order`:
alternate, or separate with each side alone on the device), traces of the last pipelined job,
and the case's rows. Re-exported by harness.bench. Not here: the sides themselves
(harness/bench_sides.py), the row and table helpers (harness/bench_records.py), the suite loop
and the command (harness/bench.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.bench_records import RowMaker, _now, add_throughput_rows
from harness.bench_sides import (MAX_STEPS_PER_BLOCK, BenchFailure, InProcessEngine, JaxOutOfMemory,
                                 JaxWorker, JobResult, _is_cuda, engine_config,
                                 jax_memory_fraction, run_pipeline_job)
from harness.config import CaseConfig, case_slug
from harness.errors import ConfigError, EngineError
from harness.omp_wait import cpu_busy_elsewhere
from harness.records import Record

# JAX variants tried in order when the case's own step runs out of memory; each that fits is
# its own labelled baseline (side "jax" for the first, "jax-<variant>" for the others)
JAX_FALLBACKS = ("remat", "accum")
ORDERS = ("auto", "alternate", "separate")


def _busy_elsewhere() -> float | None:
    """Cores' worth of CPU other processes used over a short window now (this process and its
    threads excluded; harness/omp_wait.py), unlike the load average, which counts the bench's
    own work of the last minute."""
    v = cpu_busy_elsewhere()
    return None if v is None else round(v, 2)


def _loadavg() -> float | None:
    """The 1-minute load average: other work on the machine is the first suspect for noise."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None



# ---- one case ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    repeats: int
    warmup: int
    threads: int
    jax: bool
    min_block_s: float
    timeout: float
    order: str = "auto"
    mps: str = "auto"  # harness.mps mode for CUDA ranks sharing a GPU


# JAX's share of the GPU when it runs alone (order = separate): all of it but the CUDA context's
# and the allocator's slack
SEPARATE_FRACTION = 0.95


def _engine_asked_bytes(message: str) -> int | None:
    """The size in the engine's out-of-memory message ("cudaMalloc of N bytes", "cannot allocate
    4 x N bytes", "cannot allocate N activation elements")."""
    import re

    for pat, mul in ((r"cudaMalloc of (\d+) bytes", 1), (r"allocate 4 x (\d+) bytes", 4),
                     (r"allocate (\d+) activation elements", 4)):
        m = re.search(pat, message)
        if m:
            return int(m.group(1)) * mul
    return None


def resolve_order(order: str, case: CaseConfig) -> str:
    """auto: alternate on CPU (drift on a shared machine cancels in the ratio), separate on a
    GPU (each side gets the whole device: an engine holding its memory during JAX's block, or
    JAX's allocator holding it during the engine's, would rob the other side)."""
    if order not in ORDERS:
        raise ConfigError(f"--order = {order!r}: expected one of {', '.join(ORDERS)}")
    if order == "auto":
        return "separate" if _is_cuda(case) else "alternate"
    return order


def _steps_for(calib_s: float, case: CaseConfig, min_block_s: float) -> int:
    want = math.ceil(min_block_s / max(calib_s, 1e-9))
    return int(min(max(case.steps, want), MAX_STEPS_PER_BLOCK))


def _param_table(case: CaseConfig, engine: InProcessEngine | None) -> list[tuple[str, tuple]]:
    """(name, shape) in table order: the engine's own table (exported through the ABI) where the
    engine runs; reference.gpt2.param_shapes, which mirrors it, for cases the engine cannot run
    (CUDA) so that a large model is not allocated on the host just to read names."""
    if engine is not None:
        return [(p.name, p.shape) for p in engine.model.table]
    if not _is_cuda(case):
        from harness.engine import Model

        probe = Model(**engine_config(case, 1, batch_size=1) | {"seq_len": 1})
        try:
            return [(p.name, p.shape) for p in probe.table]
        finally:
            probe.close()
    from reference.gpt2 import param_shapes

    return list(param_shapes(case.model).items())


def run_case(case: CaseConfig, out: Path, settings: Settings, env: dict, peak_of, pbar,
             suite_name: str, notes: dict[str, Any]) -> list[Record]:
    """Benchmark one case; returns its rows and fills `notes` (the case's run.json entry, kept
    also when a side fails). Raises BenchFailure/TandemError on a failure of either side (the
    caller records it)."""
    from harness.data import make_case_data
    from harness.init import init_params, write_safetensors

    slug = case_slug(case)
    work = out / "work" / slug
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    R, W = settings.repeats, settings.warmup
    P = case.pipeline.stages
    pipelined = P > 1
    notes.update(slug=slug, notes=[], engine={}, jax={}, loadavg_start=_loadavg(),
                 busy_elsewhere_start=_busy_elsewhere())
    t_case = time.perf_counter()

    # the same tokens for both sides: S = warmup + steps batches; untimed steps cycle over all
    # of them, timed steps over the last `steps`
    S = W + case.steps
    x_SBT, y_SBT = make_case_data(dataclasses.replace(case, steps=S))
    untimed = [j % S for j in range(max(W, 1))]
    timed = [W + i for i in range(case.steps)]

    # ---- which engine runs: in-process (one stage, CPU or the CUDA backend), mpirun
    # (pipelines: CPU ranks, or CUDA ranks on one GPU each or sharing one), or none (a library
    # built without CUDA)
    pbar.set_description(f"{case.name}: setup")
    inproc: InProcessEngine | None = None
    engine_available = True
    if not pipelined:
        # out of memory is a result: recorded, then the same global batch over twice as many
        # micro-batches, until one fits or a micro-batch is one sequence
        M_e, B = case.pipeline.microbatches, case.batch_size
        notes["engine_attempts"] = []
        while inproc is None and engine_available:
            try:
                inproc = InProcessEngine(case, settings.threads, microbatches=M_e)
            except EngineError as exc:
                if exc.status == "TD_ERR_NOMEM":
                    msg = (f"out of memory at B{B} over {M_e} micro-batch(es) of {B // M_e}: "
                           f"{exc}")
                    notes["engine_attempts"].append({"micro_batches": M_e, "status": "oom",
                                                     "message": msg,
                                                     "asked_bytes": _engine_asked_bytes(str(exc))})
                    notes["notes"].append(f"engine: {msg}")
                    if (B // M_e) % 2 == 0:
                        M_e *= 2
                        continue
                    engine_available, why = False, "out of memory at every micro-batch size"
                elif not _is_cuda(case):
                    raise
                else:
                    engine_available, why = False, f"the engine cannot run on CUDA here: {exc}"
        if inproc is not None and M_e != case.pipeline.microbatches:
            notes["engine_baseline"] = (f"gradient accumulation over {M_e} micro-batches "
                                        f"(the case's {case.pipeline.microbatches} did not fit)")
            notes["notes"].append(f"engine: {notes['engine_baseline']}")
    if not engine_available:
        oom = any(a["status"] == "oom" for a in notes.get("engine_attempts", []))
        notes["engine"] = {"status": "out of memory" if oom else "unavailable", "note": why}
        notes["notes"].append(f"engine side not run: {why}")
        if not settings.jax:
            raise BenchFailure(f"neither side can run: {why}; and --no-jax was given")

    jax_runs: list[dict[str, Any]] = []
    side_order = resolve_order(settings.order, case)
    notes["order"] = side_order
    try:
        # ---- weights: seeded init written once, loaded by both sides
        table = _param_table(case, inproc)
        weights = work / "weights.safetensors"
        write_safetensors(weights, init_params(table, case.model.n_layer, case.seed),
                          metadata={"case": case.name, "seed": str(case.seed)})

        # ---- engine: warm-up and calibration (first: a failing engine costs no JAX compile)
        pbar.set_description(f"{case.name}: engine warm-up")
        threads_per_rank = max(1, settings.threads // P)
        if inproc is not None:
            inproc.load(weights)
            warm = [inproc.step(x_SBT[j], y_SBT[j]) for j in untimed]
            from harness.engine_lib import WAIT_POLICY  # what libgomp was given when it loaded

            notes["engine"] = {"mode": "in-process harness.engine.Model.train_step",
                               "omp_wait": dict(WAIT_POLICY),
                               "threads": settings.threads, "warmup_step_s": warm,
                               "steps_per_block": [], "base_rss_bytes": inproc.base_rss,
                               "hwm_reset": inproc.reset_ok}
        elif engine_available:
            order = list(range(W)) + [timed[i % len(timed)] for i in range(case.steps)]
            job = run_pipeline_job(case, weights, x_SBT, y_SBT, order, W, work / "calibrate",
                                   threads_per_rank, settings.timeout, settings.mps)
            # the fastest step: noise only slows steps down, and a block sized on the fastest
            # one lasts at least min_block_s
            calib = min(job.step_s)
            n_engine = _steps_for(calib, case, settings.min_block_s)
            shutil.rmtree(work / "calibrate", ignore_errors=True)
            notes["engine"] = {"mode": f"mpirun -n {P} tandem-engine (harness.pipeline)",
                               "threads_per_rank": threads_per_rank, "calib_step_s": calib,
                               "steps_per_block": n_engine,
                               "steps_per_job": W + n_engine,
                               "calibration": "one untimed mpirun job of warmup + steps steps",
                               "transport": job.transport, "devices": job.devices,
                               **({"mps": job.mps} if job.mps else {})}
            ncpu = os.cpu_count() or 1
            if not _is_cuda(case):
                notes["notes"].append(
                    f"CPU pipeline: {P} ranks x {threads_per_rank} thread(s) share {ncpu} cores, "
                    "so these timings measure the schedule (bubble, ordering), not the speed a "
                    f"{P}-device pipeline would reach")
            elif job.devices is not None and job.devices < P:
                how = ("under a CUDA MPS daemon, so the ranks' kernels run concurrently as on "
                       "separate GPUs but share its SMs and bandwidth" if job.mps in
                       ("private", "external") else
                       f"time-sliced (no MPS: {job.mps or 'not asked'}), so stages run one "
                       "after another")
                notes["notes"].append(
                    f"GPU pipeline: {P} ranks share {job.devices} GPU(s) (transport "
                    f"{job.transport}), {how}; the step measures the cost of pipelining "
                    "(bubble, transfers, smaller products) and MFU is against "
                    f"{job.devices} GPU(s), not {P}")

        # ---- JAX: the case's own step, and when it runs out of memory each fallback variant
        # (remat, more micro-batches) that fits, each its own labelled baseline
        jax_runs: list[dict[str, Any]] = []
        data_path = work / "data.npz"
        np.savez(data_path, inputs_SBT=x_SBT, targets_SBT=y_SBT,
                 untimed_order=np.asarray([0] + untimed), timed_order=np.asarray(timed))

        def jax_fraction() -> float | None:
            if not _is_cuda(case):
                return None
            if side_order == "separate":
                notes["jax_memory"] = (f"JAX runs alone on the GPU (order = separate: the "
                                       f"engine has released its memory), "
                                       f"XLA_PYTHON_CLIENT_MEM_FRACTION={SEPARATE_FRACTION}")
                return SEPARATE_FRACTION
            if pipelined and engine_available:
                fraction, notes["jax_memory"] = jax_memory_fraction(job, env)
                return fraction
            return None

        def start_jax(variant: str) -> dict[str, Any] | None:
            """Start and set up one JAX variant; None (recorded) when it does not fit."""
            pbar.set_description(f"{case.name}: JAX compile ({variant})")
            worker = JaxWorker(case, work / f"jax-{variant}.log", jax_fraction())
            try:
                if _is_cuda(case) and not peak_of(case)[0] > 0:
                    env["gpu_gemm_peak"] = worker.request({"op": "peak"})["gpu_gemm_peak"]
                c = {"model": dataclasses.asdict(case.model),
                     "optim": dataclasses.asdict(case.optim), "stages": P,
                     "microbatches": case.pipeline.microbatches,
                     "schedule": case.pipeline.schedule, "dtype": case.dtype,
                     "backend": case.backend, "uneven_layers": case.pipeline.layers is not None}
                setup = worker.request({"op": "setup", "case": c, "data": str(data_path.resolve()),
                                        "weights": str(weights.resolve()), "warmup": W,
                                        "steps": case.steps, "variant": variant,
                                        "min_block_s": settings.min_block_s,
                                        "max_steps": MAX_STEPS_PER_BLOCK})
            except JaxOutOfMemory as exc:
                worker.close()
                notes["jax_attempts"].append({"variant": variant, "status": "oom", **exc.info})
                notes["notes"].append(f"JAX {variant}: {exc.info['message']}")
                return None
            except BaseException:
                worker.close()
                raise
            notes["jax_attempts"].append({"variant": variant, "status": "ok",
                                          "baseline": setup["baseline"],
                                          "micro_batches": setup.get("micro_batches"),
                                          "need_bytes": setup.get("need_bytes"),
                                          "limit_bytes": setup.get("limit_bytes")})
            side = "jax" if not jax_runs else f"jax-{variant}"
            run = {"side": side, "variant": variant, "worker": worker, "setup": setup,
                   "step_s": [], "mem": []}
            jax_runs.append(run)
            info = {k: setup[k] for k in ("compile_s", "first_call_s", "calib_step_s",
                                          "compilations", "compile_events_s", "devices",
                                          "base_rss_bytes")}
            if side == "jax":
                notes["jax_baseline"] = setup["baseline"]
                notes["jax_baseline_note"] = setup["baseline_note"]
                notes["jax"] = info
                if setup["baseline"].startswith("single-device (fallback)"):
                    notes["notes"].append(setup["baseline_note"])
            else:
                notes.setdefault("jax_baselines", {})[side] = {
                    "baseline": setup["baseline"], "note": setup["baseline_note"], **info}
            return run

        def jax_variants():
            """The variants to run, started one at a time (a generator: in order = separate
            each runs its blocks and is closed before the next one starts)."""
            if not settings.jax:
                return
            notes["jax_attempts"] = []
            run = start_jax("plain")
            if run is not None:
                yield run
                return
            for variant in JAX_FALLBACKS:
                run = start_jax(variant)
                if run is not None:
                    yield run
            if not jax_runs:
                notes["notes"].append("JAX did not fit in any variant (plain, "
                                      + ", ".join(JAX_FALLBACKS) + "): no JAX rows")

        if not settings.jax:
            notes["jax_baseline"] = "none (--no-jax)"
            notes["jax"] = {"status": "not run (--no-jax)"}
        else:
            notes["jax"] = {}

        # ---- timed repeats: alternating (engine, JAX, engine, ...) or separate (every engine
        # block, the engine's memory released, then every block of each JAX variant alone)
        eng_step_s: list[float] = []
        eng_mem: list[float] = []
        bubbles: list[float] = []
        sims: list[float] = []
        last_job: JobResult | None = None

        def engine_block(r: int) -> None:
            nonlocal last_job
            if inproc is not None:
                per = inproc.block(x_SBT, y_SBT, timed, case.steps, settings.min_block_s)
                eng_step_s.append(statistics.median(per))
                notes["engine"]["steps_per_block"].append(len(per))
                mem, src = inproc.peak_memory()
                eng_mem.append(mem)
                notes["engine"]["peak_mem_source"] = src
                pm, psrc = inproc.process_memory()
                notes["engine"]["process_mem_bytes"], notes["engine"]["process_mem_source"] = \
                    pm, psrc
            elif engine_available:
                if last_job is not None:
                    shutil.rmtree(work / f"job{r - 1}", ignore_errors=True)
                order = list(range(W)) + [timed[i % len(timed)] for i in range(n_engine)]
                last_job = run_pipeline_job(case, weights, x_SBT, y_SBT, order, W,
                                            work / f"job{r}", threads_per_rank, settings.timeout,
                                            settings.mps)
                eng_step_s.append(statistics.median(last_job.step_s))
                bubbles.append(last_job.bubble)
                sims.append(last_job.bubble_sim)
                eng_mem.append(last_job.mem_total)
                notes["engine"]["peak_mem_source"] = (
                    f"{last_job.mem_source}; largest rank {last_job.mem_max_rank} bytes")
                if last_job.stage_bytes:
                    notes["engine"]["rank_device_bytes"] = {
                        str(r): b for r, b in sorted(last_job.stage_bytes.items())}
                if last_job.rank_bubbles:  # the last job's, rank by rank
                    notes["engine"]["rank_bubble"] = {
                        str(r): {"measured": m, "simulated": sm}
                        for r, (m, sm) in sorted(last_job.rank_bubbles.items())}

        def jax_block(run: dict[str, Any]) -> None:
            blk = run["worker"].request({"op": "block"})
            run["step_s"].append(statistics.median(blk["step_s"]))
            run["mem"].append(blk["peak_mem_bytes"])
            info = notes["jax"] if run["side"] == "jax" else notes["jax_baselines"][run["side"]]
            info["peak_mem_source"] = blk["peak_mem_source"]
            info["recompiled_steps"] = blk["recompiled_steps"]
            info.setdefault("steps_per_block", []).append(len(blk["step_s"]))

        if side_order == "alternate":
            runs = list(jax_variants())
            for r in range(R):
                pbar.set_description(f"{case.name}: repeat {r + 1}/{R}")
                engine_block(r)
                for run in runs:
                    jax_block(run)
                pbar.update(1)
        else:
            for r in range(R):
                pbar.set_description(f"{case.name}: engine {r + 1}/{R}")
                engine_block(r)
                pbar.update(0.5)
            if inproc is not None:  # the engine's device memory is free before JAX starts
                inproc.close()
            for run in jax_variants():
                for r in range(R):
                    pbar.set_description(f"{case.name}: JAX {run['variant']} {r + 1}/{R}")
                    jax_block(run)
                run["worker"].close()
            pbar.update(0.5 * R)

        # ---- traces and timelines of the last pipelined job
        if last_job is not None:
            from harness.timeline import load_timelines, write_chrome_trace

            tl_dir = out / "timelines" / slug
            if tl_dir.exists():
                shutil.rmtree(tl_dir)
            tl_dir.mkdir(parents=True)
            for f in sorted(last_job.timeline_dir.glob("timeline_rank*.csv")):
                shutil.copy2(f, tl_dir / f.name)
            df = load_timelines(tl_dir)
            keep = df[(df["step"] >= W) & (df["step"] < W + 10)]  # the first 10 timed steps
            write_chrome_trace(keep, out / "traces" / f"{slug}.json")
            notes["trace"] = f"traces/{slug}.json (timed steps {W}..{W + 9} of the last job)"
            notes["timelines"] = f"timelines/{slug}/ (every step of the last job; steps < {W} "\
                                 "are warm-up)"
    finally:
        for run in jax_runs:
            run["worker"].close()
        if inproc is not None:
            inproc.close()

    # ---- rows
    stamp = _now()
    device = (env.get("gpu_name") or "cuda") if _is_cuda(case) else env.get("cpu_model", "cpu")
    rows = RowMaker(suite_name, case, device, env.get("commit", "unknown"), stamp)
    devices = last_job.devices if last_job is not None else None
    peak = peak_of(case, devices)
    if not peak[0] > 0:
        notes["notes"].append(f"no peak FLOP/s for {case.backend} {case.dtype} ({peak[1]}): "
                              "no MFU rows")
    if eng_step_s:
        add_throughput_rows(rows, "engine", case, eng_step_s, peak)
        rows.add("engine", "peak_mem_bytes", "B", eng_mem)
    for run in jax_runs:
        if not run["step_s"]:
            continue
        side = run["side"]
        add_throughput_rows(rows, side, case, run["step_s"], peak)
        rows.add(side, "peak_mem_bytes", "B", run["mem"])
        cs = run["setup"]["compile_s"]
        rows.add(side, "compile_s", "s", [cs], summary=(cs, cs, cs))
        if eng_step_s:  # pairs in repeat order (alternated, or the r-th block of each side)
            metric = "speedup" if side == "jax" else f"speedup_vs_{run['variant']}"
            rows.add("ratio", metric, "x", [j / e for e, j in zip(eng_step_s, run["step_s"])])
    # a side that did not fit is a result: what it asked for
    for a in notes.get("jax_attempts", []):
        if a["status"] == "oom" and a.get("asked_bytes"):
            rows.add(f"jax-{a['variant']}", "oom_asked_bytes", "B", [a["asked_bytes"]])
    first_oom = next((a for a in notes.get("engine_attempts", []) if a["status"] == "oom"), None)
    if first_oom is not None and first_oom.get("asked_bytes"):
        rows.add("engine", "oom_asked_bytes", "B", [first_oom["asked_bytes"]])
    if pipelined:
        from harness import schedule as sched

        p = case.pipeline
        th = sched.theoretical_bubble(p.schedule, P, p.microbatches, p.chunks)
        rows.add("theory", "bubble", "fraction", [], summary=(th.of_step,) * 3)
        notes["bubble_theory"] = (f"{th.formula} = {th.of_compute:.4g} of ideal compute, "
                                  f"{th.of_step:.4g} of the step (equal stage times)")
        if bubbles:
            rows.add("engine", "bubble", "fraction", bubbles)
            rows.add("theory", "bubble_sim", "fraction", sims)
        if last_job is not None and last_job.mem_max_rank:
            rows.add("engine", "max_rank_mem_bytes", "B", [last_job.mem_max_rank])
    if notes["jax"].get("recompiled_steps"):
        notes["notes"].append(f"JAX compiled again during {notes['jax']['recompiled_steps']} "
                              "timed step(s): its timings include compile time")
    notes["loadavg_end"] = _loadavg()
    notes["busy_elsewhere_end"] = _busy_elsewhere()
    notes["wall_s"] = time.perf_counter() - t_case
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / "work").rmdir()  # only when no other case left scratch files there
    return rows.rows
