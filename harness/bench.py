"""`tandem bench`: engine vs JAX on the same case, weights and tokens, timed in alternating
blocks (drift cancels in the ratio), warm-up excluded, JAX compile time apart; rows to
DIR/records.parquet, environment and per-case notes to DIR/run.json, traces of pipelined runs.
Not here: the JAX step (harness/bench_jax.py, a worker process), schedule theory, parity.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import selectors
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from harness import flops as fl
from harness.mps import MODES as MPS_MODES
from harness.bench_jax import _vm_kib, rss_high_water_bytes
from harness.config import (CaseConfig, SuiteConfig, case_axes, case_id, case_slug, load_suite,
                            microbatch_size, require_model_passes)
from harness.errors import ConfigError, DataError, EngineError, TandemError
from harness.records import RECORD_COLUMNS, Record, append_parquet, to_frame, write_json

MIN_BLOCK_S = 0.3  # a timed block lasts at least this long (steps per block chosen to fit)
MAX_STEPS_PER_BLOCK = 2000  # ... but never more steps than this
WORKER_TIMEOUT_S = 1800.0  # one JAX request (setup = compile; block) may take this long
PIPELINE_TIMEOUT_S = 600.0  # one mpirun job
RANK_SAMPLE_S = 0.1  # how often the ranks' VmHWM is read during a pipelined job

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
              "step; theory bubble_sim: harness.schedule.simulate with the job's mean F/B/W "
              "durations",
}


class BenchFailure(TandemError):
    """One side of one case failed (a rank, the engine, the JAX worker): the case is recorded
    as failed in run.json and the run goes on; `tandem bench` then exits 3."""

    exit_code = 3


class JaxOutOfMemory(BenchFailure):
    """JAX's step of one variant did not fit the device: a result (recorded), not a failure.
    `info`: variant, batch, micro_batches, asked_bytes, limit_bytes, message."""

    def __init__(self, message: str, info: dict[str, Any]):
        super().__init__(message)
        self.info = info


# JAX variants tried in order when the case's own step runs out of memory; each that fits is
# its own labelled baseline (side "jax" for the first, "jax-<variant>" for the others)
JAX_FALLBACKS = ("remat", "accum")
ORDERS = ("auto", "alternate", "separate")


# ---- small helpers -----------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def summarize(values) -> tuple[float, float, float]:
    """(median, 25th percentile, 75th percentile) with numpy's linear interpolation."""
    a = np.asarray(values, dtype=float)
    return float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75))


def _reset_rss_high_water() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _gpu_bytes_by_pid() -> dict[int, int]:
    """Device memory each process holds according to nvidia-smi ({} when it cannot tell)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict[int, int] = {}
    for line in r.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = out.get(int(parts[0]), 0) + int(parts[1]) * 2**20
    return out


def _gpu_process_bytes(pid: int) -> int:
    """Device memory `pid` holds according to nvidia-smi (0 when it cannot tell)."""
    return _gpu_bytes_by_pid().get(pid, 0)


def _package_root() -> Path:
    """The directory holding the harness package this process imported (the worker must import
    the same harness and reference)."""
    import harness

    return Path(harness.__file__).resolve().parent.parent


def _loadavg() -> float | None:
    """The 1-minute load average: other work on the machine is the first suspect for noise."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _is_cuda(case: CaseConfig) -> bool:
    return case.backend == "cuda"


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


# ---- the JAX worker ----------------------------------------------------------------------------


class JaxWorker:
    """A `python -m harness.bench_jax` process for one case, driven line by line (see the
    protocol at the top of bench_jax.py). Its stderr goes to `log`."""

    def __init__(self, case: CaseConfig, log: Path, mem_fraction: float | None = None):
        env = dict(os.environ)
        root = str(_package_root())
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "")
                                                      .split(os.pathsep) if p])
        if not _is_cuda(case):
            # CPU cases stay on CPU even on a GPU host; P host devices for the GPipe baseline
            env["JAX_PLATFORMS"] = "cpu"
            flags = [f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            flags.append(f"--xla_force_host_platform_device_count={case.pipeline.stages}")
            env["XLA_FLAGS"] = " ".join(flags)
        else:
            # allocate on demand: the engine shares the GPU, and peak_bytes_in_use is then the
            # step's own peak rather than a preallocated pool
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            if mem_fraction is not None:
                env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.3f}"
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.bench_jax"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env)
        self._buf = b""

    def request(self, obj: dict[str, Any], timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchFailure(f"JAX worker died before {obj.get('op')!r}: "
                               f"{self._tail()}") from None
        line = self._readline(timeout, obj.get("op"))
        reply = json.loads(line)
        if not reply.get("ok"):
            self._log.write(reply.get("traceback", "") + "\n")
            self._log.flush()
            if reply.get("oom"):
                raise JaxOutOfMemory(f"JAX side ({obj.get('op')}): {reply.get('error')}",
                                     reply["oom"])
            raise BenchFailure(f"JAX side ({obj.get('op')}): {reply.get('error')} "
                               f"(traceback in {self.log_path})")
        return reply

    def _readline(self, timeout: float, op) -> bytes:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise BenchFailure(f"JAX worker gave no answer to {op!r} in {timeout:.0f} s "
                                       f"and was killed (log: {self.log_path})")
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = self.proc.wait()
                    raise BenchFailure(f"JAX worker exited with code {code} during {op!r}: "
                                       f"{self._tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _tail(self, n: int = 6) -> str:
        self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return " | ".join(lines[-n:]) + f" (log: {self.log_path})"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"op": "quit"}, timeout=10)
                self.proc.wait(timeout=10)
            except (BenchFailure, subprocess.TimeoutExpired, ValueError):
                self.kill()
        self._log.close()


# ---- engine sides ------------------------------------------------------------------------------


def engine_config(case: CaseConfig, threads: int, batch_size: int | None = None) -> dict:
    """harness.engine.Model keys for a one-stage model of `case` (batch_size = micro-batch
    size); CUDA cases ask for the engine's CUDA backend and the case's dtype."""
    m, o = case.model, case.optim
    device = {"backend": "cuda", "dtype": case.dtype} if _is_cuda(case) else {}
    return dict(**device, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                vocab_size=m.vocab_size, n_positions=m.n_positions, seq_len=case.seq_len,
                batch_size=batch_size or microbatch_size(case), threads=threads, lr=o.lr,
                beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                grad_clip=o.grad_clip)


class InProcessEngine:
    """One-stage engine through harness.engine.Model.train_step, in this process."""

    def __init__(self, case: CaseConfig, threads: int, microbatches: int | None = None):
        from harness.engine import Model

        self.M = microbatches or case.pipeline.microbatches
        self.b = case.batch_size // self.M
        self.model = Model(**engine_config(case, threads, batch_size=self.b))
        self.cuda = _is_cuda(case)

    def peak_memory(self) -> tuple[int, str]:
        """The engine's own allocation counter (it allocates everything when the model is
        built, so what it holds is its peak): device bytes on CUDA (`device_bytes`), host bytes
        on CPU (`host_bytes`: parameters, gradients, AdamW moments, activations). The bench
        process's RSS (JAX-free: JAX runs in its own worker) is kept in run.json."""
        if self.cuda:
            return self.model.get_int("device_bytes"), "the engine's device allocations " \
                "(libtandem device_bytes; nvidia-smi of the process in run.json)"
        return self.model.get_int("host_bytes"), "the engine's host allocations (libtandem " \
            "host_bytes: parameters, gradients, AdamW moments, activations)"

    def process_memory(self) -> tuple[int, str]:
        """What the bench process holds: nvidia-smi on CUDA, VmHWM since the case started on
        CPU (Python, NumPy and the harness included)."""
        if self.cuda:
            return _gpu_process_bytes(os.getpid()), "nvidia-smi used_memory of the bench process"
        mem, src = rss_high_water_bytes()
        return mem, src + (" since the case started" if self.reset_ok else
                           " (lifetime: could not be reset)")

    def load(self, weights: Path) -> None:
        """Load the case's weights; the process's RSS high-water mark restarts here, so the
        harness's own work before (seeded init, data) does not count as the engine's."""
        self.reset_ok = _reset_rss_high_water()
        self.base_rss = (_vm_kib("VmRSS") or 0) * 1024
        self.model.load_safetensors(weights)

    def step(self, x_BT: np.ndarray, y_BT: np.ndarray) -> float:
        T = x_BT.shape[-1]
        t0 = time.perf_counter()
        self.model.train_step(x_BT.reshape(self.M, self.b, T), y_BT.reshape(self.M, self.b, T))
        return time.perf_counter() - t0

    def block(self, x_SBT, y_SBT, timed: list[int], min_steps: int, min_s: float) -> list[float]:
        """A timed block: at least `min_steps` steps, and more until it has lasted `min_s`
        (at most MAX_STEPS_PER_BLOCK); per-step wall seconds."""
        per: list[float] = []
        t0 = time.perf_counter()
        while len(per) < min_steps or (time.perf_counter() - t0 < min_s
                                       and len(per) < MAX_STEPS_PER_BLOCK):
            b = timed[len(per) % len(timed)]
            per.append(self.step(x_SBT[b], y_SBT[b]))
        return per

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None


class RankMemory:
    """Samples the RSS high-water mark (VmHWM) of every `tandem-engine` rank whose command line
    names `marker` (the job's run file), from a thread, every RANK_SAMPLE_S seconds. VmHWM only
    grows and ranks allocate up front, so the last sample is the rank's peak up to what it
    allocates in its final interval."""

    def __init__(self, marker: str, ranks: int, gpu: bool = False):
        self.marker, self.ranks, self.gpu = marker, ranks, gpu
        self.peaks: dict[int, int] = {}
        self.gpu_peaks: dict[int, int] = {}  # device memory each rank held (nvidia-smi), GPU jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _scan(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in self.peaks:
                continue
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"tandem-engine") and any(
                    self.marker.encode() in a for a in argv[1:]):
                self.peaks[int(name)] = 0

    def _loop(self) -> None:
        while True:
            if len(self.peaks) < self.ranks:
                self._scan()
            for pid in list(self.peaks):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peaks[pid] = max(self.peaks[pid], int(line.split()[1]) * 1024)
                except (OSError, ValueError, IndexError):
                    pass  # the rank has exited: its last sample stands
            if self.gpu and self.peaks:
                for pid, used in _gpu_bytes_by_pid().items():
                    if pid in self.peaks:
                        self.gpu_peaks[pid] = max(self.gpu_peaks.get(pid, 0), used)
            if self._stop.wait(RANK_SAMPLE_S):
                return


@dataclasses.dataclass
class JobResult:
    step_s: list[float]  # timed steps only
    bubble: float
    bubble_sim: float
    mem_total: int
    mem_max_rank: int
    ranks_seen: int
    timeline_dir: Path
    mem_source: str = ""
    devices: int | None = None  # distinct GPUs the ranks ran on (0: CPU ranks; None: unknown)
    transport: str | None = None
    stage_bytes: dict[int, int] = dataclasses.field(default_factory=dict)  # rank -> device bytes
    mps: str = ""  # harness.mps: what the job ran under ("" for CPU ranks)


def _timed_bubble(timeline_dir: Path, case: CaseConfig, first_timed: int):
    """(median measured bubble over the timed steps, simulated bubble from the mean F/B/W
    durations of those steps, the timeline DataFrame)."""
    from harness import schedule as sched
    from harness.timeline import load_timelines, measured_bubble

    df = load_timelines(timeline_dir)
    steps = sorted(s for s in df["step"].unique() if s >= first_timed)
    if not steps:
        raise DataError(f"{timeline_dir}: no timed steps (>= {first_timed}) in the timeline")
    bubble = statistics.median(measured_bubble(df, step=int(s)) for s in steps)
    d = df[df["step"] >= first_timed]
    dur = (d["end_us"] - d["start_us"]).groupby(d["kind"]).mean()
    f = float(dur.get("F", 0.0))
    if "BW" in dur:
        b = w = float(dur["BW"]) / 2.0
    else:
        b, w = float(dur.get("B", 0.0)), float(dur.get("W", 0.0))
    p = case.pipeline
    sim = sched.simulate(sched.generate(p.schedule, p.stages, p.microbatches, p.chunks),
                         f=f, b=b, w=w).bubble
    return float(bubble), float(sim), df


def jax_memory_fraction(job: JobResult, env: dict) -> tuple[float | None, str]:
    """JAX's share of each GPU (XLA_PYTHON_CLIENT_MEM_FRACTION) for a case whose engine side is
    separate rank processes: JAX's allocator keeps what it has taken, so with the default (75%)
    the engine's next job can find the GPU full. JAX gets all but what the engine's ranks held
    per GPU in the calibration job (+5% and 1 GiB), at most 95%; (None, why) when unknown."""
    total = next((g.get("memory_bytes") for g in env.get("gpus") or [] if g.get("memory_bytes")),
                 None)
    need = job.mem_total if (job.devices or 1) <= 1 else job.mem_max_rank
    if not total or not need:
        return None, "JAX's default memory fraction (the GPU's size or the engine's use unknown)"
    frac = min(0.95, (total - 1.05 * need - 2**30) / total)
    if frac < 0.2:
        return None, (f"JAX's default memory fraction: the engine's ranks held {need / 2**30:.1f} "
                      f"of {total / 2**30:.1f} GiB, too much to leave JAX a fair share")
    return frac, (f"JAX may take {frac:.1%} of the GPU's {total / 2**30:.1f} GiB "
                  f"(XLA_PYTHON_CLIENT_MEM_FRACTION): the engine's ranks held "
                  f"{need / 2**30:.1f} GiB per GPU in the calibration job and run again "
                  "between JAX's blocks")


def run_pipeline_job(case: CaseConfig, weights: Path, x_SBT, y_SBT, order: list[int],
                     warmup: int, workdir: Path, threads: int, timeout: float,
                     mps: str = "auto") -> JobResult:
    """One mpirun job over the batches `order` (warm-up ones first); drops the first `warmup`
    steps. RankFailure propagates."""
    from harness.pipeline import run_pipeline

    workdir.mkdir(parents=True, exist_ok=True)
    marker = str((workdir / "run.txt").resolve())
    gpu = _is_cuda(case)
    with RankMemory(marker, case.pipeline.stages, gpu=gpu) as mem:
        res = run_pipeline(case, weights, x_SBT[order], y_SBT[order], workdir, timeout=timeout,
                           threads=threads, mps=mps)
    step_s = [float(s) for s in res.step_s[warmup:]]
    bubble, sim, _ = _timed_bubble(res.timeline_dir, case, warmup)
    stage_bytes = {int(r["rank"]): int(r["device_bytes"]) for r in res.ranks}
    if gpu:
        # device memory: what nvidia-smi saw each rank hold (context, cuBLAS workspace and the
        # engine's buffers; the engine allocates up front, so held ~ peak)
        peaks = list(mem.gpu_peaks.values())
        source = (f"sum over {len(peaks)} ranks of the device memory each held (nvidia-smi "
                  f"used_memory, sampled every {RANK_SAMPLE_S} s)")
    else:
        peaks = list(mem.peaks.values())
        source = f"sum over {len(peaks)} ranks of VmHWM (sampled every {RANK_SAMPLE_S} s)"
    return JobResult(step_s, bubble, sim, int(sum(peaks)), int(max(peaks, default=0)),
                     len(peaks), res.timeline_dir, source, res.devices, res.transport,
                     stage_bytes, res.mps)


# ---- records -----------------------------------------------------------------------------------


class RowMaker:
    """Builds the Record rows of one case: every row carries the case axes, device, backend,
    dtype, commit and timestamp."""

    def __init__(self, suite: str, case: CaseConfig, device: str, commit: str, stamp: str):
        axes = case_axes(case)
        if case.pipeline.stages == 1:
            axes["schedule"] = "none"  # one stage runs no schedule (the Record default)
        self.base = dict(suite=suite, case=case_id(case), device=device, backend=case.backend,
                         dtype=case.dtype, commit=commit, timestamp=stamp, **axes)
        self.rows: list[Record] = []

    def add(self, side: str, metric: str, unit: str, values, *, summary=None, peak=None) -> None:
        """Raw rows (repeat = 0, 1, ...) for `values`, then the summary row (repeat = -1):
        median [p25, p75] of `values`, or `summary` = (value, lo, hi) when given."""
        extra = {} if peak is None else {"peak_flops": peak[0], "peak_source": peak[1]}
        for i, v in enumerate(values):
            self.rows.append(Record(side=side, metric=metric, unit=unit, value=float(v), repeat=i,
                                    **extra, **self.base))
        med, lo, hi = summary if summary is not None else summarize(values)
        self.rows.append(Record(side=side, metric=metric, unit=unit, value=med, repeat=-1,
                                spread_lo=lo, spread_hi=hi, **extra, **self.base))


def add_throughput_rows(rows: RowMaker, side: str, case: CaseConfig, step_s: list[float],
                        peak: tuple[float, str]) -> None:
    """step_ms, tokens_per_s, flops_per_s, mfu, mfu_palm of one side from its per-repeat
    median step times. The summaries of the derived metrics are computed from the tokens/s
    summary (a linear map), so MFU = tokens/s x FLOPs/token / peak holds on every row."""
    tokens = case.batch_size * case.seq_len
    fpt, fpt_palm = fl.flops_for_case(case, "tandem"), fl.flops_for_case(case, "palm")
    tps = [tokens / s for s in step_s]
    s_tps = summarize(tps)
    rows.add(side, "step_ms", "ms", [s * 1e3 for s in step_s])
    rows.add(side, "tokens_per_s", "tokens/s", tps, summary=s_tps)
    rows.add(side, "flops_per_s", "FLOP/s", [fl.achieved_flops(fpt, t) for t in tps],
             summary=tuple(fl.achieved_flops(fpt, t) for t in s_tps))
    if peak[0] > 0:  # NaN when no peak is known: no MFU rows rather than NaN rows
        for metric, f in (("mfu", fpt), ("mfu_palm", fpt_palm)):
            rows.add(side, metric, "fraction", [fl.mfu(f, t, peak[0]) for t in tps],
                     summary=tuple(fl.mfu(f, t, peak[0]) for t in s_tps), peak=peak)


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
    notes.update(slug=slug, notes=[], engine={}, jax={}, loadavg_start=_loadavg())
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
            notes["engine"] = {"mode": "in-process harness.engine.Model.train_step",
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
    notes["wall_s"] = time.perf_counter() - t_case
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / "work").rmdir()  # only when no other case left scratch files there
    return rows.rows


# ---- run.json and the final table --------------------------------------------------------------


def _load_run_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read run.json to resume: {e}. HINT: use another --out "
                        "or remove the file") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: run.json is not a JSON object")
    return obj


def _drop_case_rows(path: Path, suite: str, case: str) -> None:
    """Remove rows of an unfinished case (an interrupted earlier run) before it runs again."""
    if not path.exists():
        return
    import pandas as pd

    df = pd.read_parquet(path)
    keep = ~((df["suite"] == suite) & (df["case"] == case))
    if not keep.all():
        tmp = path.with_suffix(".parquet.tmp")
        df[keep].to_parquet(tmp, index=False)
        tmp.replace(path)


def _fmt_si(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def format_table(records, cases: list[CaseConfig], run: dict) -> str:
    """The final table: case, engine tok/s, JAX tok/s, speedup median [p25, p75], MFU
    engine / JAX, bubble measured / theory; failed or partial cases say so."""
    import pandas as pd

    s = records[records["repeat"] == -1] if len(records) else pd.DataFrame(columns=RECORD_COLUMNS)

    def get(case, side, metric):
        m = s[(s["case"] == case) & (s["side"] == side) & (s["metric"] == metric)]
        return m.iloc[0] if len(m) else None

    head = ["case", "engine tok/s", "JAX tok/s", "speedup [p25, p75]", "MFU engine / JAX",
            "bubble meas. / theory"]
    body = []
    for c in cases:
        name = case_id(c)
        info = run.get("cases", {}).get(name, {})
        if info.get("status") == "failed":
            body.append([name, "FAILED (see below)", "-", "-", "-", "-"])
            continue
        e, j = get(name, "engine", "tokens_per_s"), get(name, "jax", "tokens_per_s")
        sp = get(name, "ratio", "speedup")
        me, mj = get(name, "engine", "mfu"), get(name, "jax", "mfu")
        bm, bt = get(name, "engine", "bubble"), get(name, "theory", "bubble")
        pct = lambda r: f"{100 * r['value']:.1f}%" if r is not None else "-"  # noqa: E731
        body.append([
            name,
            _fmt_si(e["value"]) if e is not None else (
                "OOM" if info.get("engine", {}).get("status") == "out of memory" else
                "n/a" if info.get("engine", {}).get("status") == "unavailable" else "-"),
            _fmt_si(j["value"]) if j is not None else _oom_cell(info.get("jax_attempts", [])),
            f"{sp['value']:.2f}x [{sp['spread_lo']:.2f}, {sp['spread_hi']:.2f}]"
            if sp is not None else "-",
            f"{pct(me)} / {pct(mj)}",
            f"{pct(bm)} / {pct(bt)}" if bt is not None else "-",
        ])
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                       for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _oom_cell(attempts: list[dict]) -> str:
    """The JAX column of a case whose JAX side fit in no variant: "OOM" (and the first ask)."""
    oom = [a for a in attempts if a.get("status") == "oom"]
    if not oom:
        return "-"
    asked = oom[0].get("asked_bytes")
    return f"OOM ({asked / 2**30:.1f} GiB)" if asked else "OOM"


def _table_notes(cases: list[CaseConfig], run: dict, records=None) -> list[str]:
    out = []
    for c in cases:
        info = run.get("cases", {}).get(case_id(c), {})
        if info.get("jax_baseline"):
            out.append(f"{case_id(c)}: JAX baseline = {info['jax_baseline']}")
        for side, b in (info.get("jax_baselines") or {}).items():
            line = f"{case_id(c)}: also JAX baseline {side} = {b['baseline']}"
            if records is not None and len(records):
                s = records[(records["repeat"] == -1) & (records["case"] == case_id(c))]
                t = s[(s["side"] == side) & (s["metric"] == "tokens_per_s")]
                r = s[(s["side"] == "ratio") & (s["metric"] == f"speedup_vs_{side[4:]}")]
                if len(t):
                    line += f": {_fmt_si(t.iloc[0]['value'])} tok/s"
                if len(r):
                    line += (f", engine {r.iloc[0]['value']:.2f}x [{r.iloc[0]['spread_lo']:.2f}, "
                             f"{r.iloc[0]['spread_hi']:.2f}]")
            out.append(line)
        for n in info.get("notes", []):
            out.append(f"{case_id(c)}: {n}")
        if info.get("status") == "failed":
            out.append(f"{case_id(c)}: FAILED: {info.get('error', '')}")
    return out


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
    for c in chosen:  # before anything is written: a case the engine cannot run loses nothing
        require_model_passes(c, "tandem bench")
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
    ncpu = os.cpu_count() or 1
    loads = [v for c in chosen for k in ("loadavg_start", "loadavg_end")
             if (v := run["cases"].get(case_id(c), {}).get(k)) is not None]
    if loads and max(loads) > 0.25 * ncpu:
        print(f"  machine load during the run up to {max(loads):.2f} on {ncpu} cores: other "
              "processes competed for the CPU; compare the ratios (measured in alternation), "
              "not absolute figures")
    peaks = "; ".join(f"{k}: {v['flops'] / 1e9:.1f} GFLOP/s ({v['source']})"
                      for k, v in run["peaks"].items())
    if peaks:
        print(f"  MFU peak: {peaks}")
    return 3 if failed else 0


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
