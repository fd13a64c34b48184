"""The sides of `tandem bench`, run: the JAX worker process (`JaxWorker`, driving
harness/bench_jax.py), the one-stage engine in this process (`InProcessEngine`), pipelined engine
jobs under mpirun (`run_pipeline_job`, `JobResult`) with their ranks' memory sampled from a thread
(`RankMemory`), and the failures a side raises (`BenchFailure`, `JaxOutOfMemory`). Re-exported by
harness.bench. Not here: the order of the sides' blocks (harness/bench_case.py), rows and tables
(harness/bench_records.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.bench_jax import _vm_kib, rss_high_water_bytes
from harness.config import CaseConfig, engine_model_keys, microbatch_size
from harness.errors import DataError, TandemError

MAX_STEPS_PER_BLOCK = 2000  # a timed block has never more steps than this
WORKER_TIMEOUT_S = 1800.0  # one JAX request (setup = compile; block) may take this long
RANK_SAMPLE_S = 0.1  # how often the ranks' VmHWM is read during a pipelined job


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


def _is_cuda(case: CaseConfig) -> bool:
    return case.backend == "cuda"



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
    return dict(**device, **engine_model_keys(m), seq_len=case.seq_len,
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
    # rank -> (measured idle share, median over the timed steps; simulated idle share)
    rank_bubbles: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)


def stage_durations(d, n_stages: int) -> tuple[list[float], list[float], list[float]]:
    """Mean F, B and W durations per virtual stage (0 .. n_stages-1) of timeline rows `d`: what
    the schedule simulator needs to replay a job with its own stage imbalance (the last stage
    holds the LM head, the first the embedding). A fused BW counts half to B and half to W; a
    stage without rows of a kind takes that kind's mean over every stage (0 if none ran)."""
    dur = d["end_us"] - d["start_us"]
    by_stage = dur.groupby([d["kind"], d["stage"]]).mean()
    overall = dur.groupby(d["kind"]).mean()

    def per_stage(kind):
        mean = float(overall.get(kind, 0.0))
        return [float(by_stage.get((kind, s), mean)) for s in range(n_stages)]

    f = per_stage("F")
    if "BW" in overall and "B" not in overall:
        b = [x / 2.0 for x in per_stage("BW")]
        return f, b, list(b)
    return f, per_stage("B"), per_stage("W")


def _timed_bubble(timeline_dir: Path, case: CaseConfig, first_timed: int):
    """(median measured bubble over the timed steps, simulated bubble: the schedule replayed by
    harness.schedule.simulate with those steps' mean F/B/W durations per virtual stage, the
    timeline DataFrame, {rank: (measured, simulated) idle share of that rank})."""
    from harness import schedule as sched
    from harness.timeline import bubble_per_rank, load_timelines, measured_bubble

    df = load_timelines(timeline_dir)
    steps = sorted(s for s in df["step"].unique() if s >= first_timed)
    if not steps:
        raise DataError(f"{timeline_dir}: no timed steps (>= {first_timed}) in the timeline")
    bubble = statistics.median(measured_bubble(df, step=int(s)) for s in steps)
    p = case.pipeline
    s = sched.generate(p.schedule, p.stages, p.microbatches, p.chunks)
    timed = df[df["step"] >= first_timed]
    f, b, w = stage_durations(timed, s.stages)
    run = sched.simulate(s, f=f, b=b, w=w)
    per_rank = bubble_per_rank(timed).median()
    ranks = {int(r): (float(per_rank[r]),
                      1.0 - run.busy[int(r)] / run.makespan if run.makespan > 0 else 0.0)
             for r in per_rank.index if 0 <= int(r) < len(run.busy)}
    return float(bubble), float(run.bubble), df, ranks


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
    bubble, sim, _, rank_bubbles = _timed_bubble(res.timeline_dir, case, warmup)
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
                     stage_bytes, res.mps, rank_bubbles)
