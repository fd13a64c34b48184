"""CUDA MPS for pipeline ranks that share a GPU.

Without MPS, CUDA time-slices the GPU between processes: while one rank's kernels run, the other
ranks' wait, so a P-rank pipeline on one GPU pays for every stage in series plus the switches.
Under an MPS server the ranks' kernels run concurrently, as the stages of a real pipeline do on
P devices (measured on one H100, GPT-2 350M, 4 ranks, M = 16: 126-129k tok/s time-sliced, 164-165k
with MPS against 144-147k for the one-stage engine; docs/cuda.md "GPU pipelines").

`job_mps(mode, ranks)` is what harness.pipeline wraps each CUDA job in (`tandem bench --mps`,
default auto; run_pipeline's own default is $TANDEM_MPS, else off):
  - "off": nothing; the ranks are time-sliced (or use whatever MPS server the caller set up).
  - "auto": when more ranks than visible GPUs and no MPS server is already
    reachable, a private MPS control daemon is started for the job (its own pipe and log
    directories under a temporary directory, so it serves this job's ranks only) and stopped
    after; when it cannot start, the job runs time-sliced and the reason is recorded.
  - "on": as auto, but a daemon that cannot start is an error naming why.
The result says which happened ("private", "external", "off", "unavailable: ...") for records.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.errors import ConfigError

MODES = ("auto", "on", "off")
CONTROL = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 10.0


def visible_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list (0 when
    neither tells)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return len(r.stdout.split()) if r.returncode == 0 else 0


def server_reachable(env: dict[str, str] | None = None) -> bool:
    """Is an MPS control daemon listening where CUDA clients with `env` would look for it?"""
    env = os.environ if env is None else env
    pipe = Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps")
    return (pipe / "control").exists()


class PrivateDaemon:
    """An MPS control daemon with its own pipe and log directories; stop() quits it."""

    def __init__(self, control: str):
        self.root = Path(tempfile.mkdtemp(prefix="tandem-mps-"))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.root / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.root / "log")}
        for d in self.env.values():
            Path(d).mkdir()
        self.control = control

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.control, *args], input=stdin, capture_output=True,
                              text=True, timeout=START_TIMEOUT_S, env={**os.environ, **self.env})

    def start(self) -> str | None:
        """Start the daemon; None when it listens, else why not."""
        try:
            r = self._run(["-d"])
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{CONTROL} -d: {exc}"
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            return f"{CONTROL} -d exited {r.returncode}: {why[0]}"
        t_end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < t_end:
            if server_reachable(self.env):
                return None
            time.sleep(0.05)
        return f"{CONTROL} -d started but no control pipe in {START_TIMEOUT_S:.0f} s"

    def stop(self) -> None:
        if server_reachable(self.env):
            try:
                self._run([], stdin="quit\n")
            except (OSError, subprocess.TimeoutExpired):
                pass
            t_end = time.monotonic() + START_TIMEOUT_S
            while server_reachable(self.env) and time.monotonic() < t_end:
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def job_mps(mode: str, ranks: int, gpus: int | None = None,
            env: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """(what happened, environment to add to the ranks') for one CUDA job of `ranks` ranks over
    `gpus` visible GPUs (counted when None); see the module doc."""
    if mode not in MODES:
        raise ConfigError(f"mps={mode!r}: allowed {', '.join(MODES)}")
    if mode == "off":
        yield "off", {}
        return
    gpus = visible_gpus() if gpus is None else gpus
    if gpus >= ranks:
        yield "off (one GPU per rank)", {}
        return
    if server_reachable(env):
        yield "external", {}
        return
    control = shutil.which(CONTROL)
    why = None if control else f"{CONTROL} not on PATH"
    daemon = None
    if control:
        daemon = PrivateDaemon(control)
        why = daemon.start()
        if why:
            daemon.stop()
            daemon = None
    if why:
        if mode == "on":
            raise ConfigError(f"mps=on: cannot start a CUDA MPS daemon for {ranks} ranks sharing "
                              f"{gpus} GPU(s): {why}. HINT: use mps=auto to run time-sliced, "
                              "or start one yourself (nvidia-cuda-mps-control -d)")
        yield f"unavailable: {why}", {}
        return
    try:
        yield "private", dict(daemon.env)
    finally:
        daemon.stop()
