"""The machine a result was measured on, and the peak FLOP/s an MFU figure divides by.

collect_env() gathers CPU, memory, GPU, library versions, compiler, engine version and git commit
for run.json; DATASHEET_PEAKS holds the vendor dense peaks; measure_* time a large GEMM to get a
measured peak (the only honest peak for a CPU). Also the `tandem env` and `tandem peak` commands.
It does not change the environment (threads, BLAS core type): it reports what it finds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

# Vendor datasheet dense (no sparsity) peaks, FLOP/s. Only the SXM parts: PCIe and NVL boards of
# the same name are clocked lower, so they are not matched and fall back to a measured peak.
DATASHEET_PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H200 SXM": {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12},
}
_NOT_SXM = ("PCIE", "NVL")

# Environment variables that change what a benchmark measures; recorded, never altered.
_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "TANDEM_LIB")


def _run(cmd: list[str], cwd: str | Path | None = None, timeout: float = 10) -> str | None:
    """stdout of a command, stripped, or None if it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[dict[str, str]]:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader,nounits"])
    gpus = []
    for line in (out or "").splitlines():
        if line.strip():
            name, driver, mem = ([x.strip() for x in line.split(",")] + ["", ""])[:3]
            gpu = {"name": name, "driver": driver}
            if mem.isdigit():
                gpu["memory_bytes"] = int(mem) * 2**20
            gpus.append(gpu)
    return gpus


def _engine_version() -> str:
    try:
        import harness.engine as engine  # loads libtandem: may fail on a machine without it

        fn = getattr(engine, "version", None)
        return str(fn()) if callable(fn) else "unavailable"
    except Exception:  # noqa: BLE001 - any failure to load the engine means "unavailable"
        return "unavailable"


def _git(*args: str) -> str | None:
    """Run git in the repository that holds this harness (a source checkout), else, for an
    installed harness, in the current directory's repository."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        if _run(["git", "-C", str(where), "rev-parse", "--is-inside-work-tree"]) == "true":
            return _run(["git", "-C", str(where), *args])
    return None


def _numpy_blas() -> str:
    try:
        import numpy as np

        deps = np.show_config(mode="dicts")["Build Dependencies"]
        blas = deps.get("blas", {})
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older numpy has no mode="dicts"; this is informative only
        return "unknown"


def collect_env() -> dict[str, Any]:
    """Describe this machine and software for run.json. Fast (no benchmark, no JAX import);
    every field is present, with "unknown"/"unavailable"/None where it cannot be found."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = None
    if commit != "unknown":
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    gcc = _run(["gcc", "--version"])
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    gpus = _gpus()
    return {
        "hostname": socket.gethostname(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_bytes": _memory_bytes(),
        "gpus": gpus,
        "gpu_name": gpus[0]["name"] if gpus else None,
        "gpu_driver": gpus[0]["driver"] if gpus else None,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numpy_blas": _numpy_blas(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "gcc": gcc.splitlines()[0] if gcc else "unknown",
        "engine": _engine_version(),
        "commit": commit,
        "commit_dirty": dirty,
        "env_vars": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
    }


# ---- peaks -------------------------------------------------------------------------------------


def datasheet_peak(gpu_name: str | None, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, source) from DATASHEET_PEAKS for a GPU name as nvidia-smi prints it
    ("NVIDIA H100 80GB HBM3"), or None when the part is not in the table."""
    if not gpu_name:
        return None
    upper = gpu_name.upper()
    if any(tag in upper for tag in _NOT_SXM):
        return None
    for part, peaks in DATASHEET_PEAKS.items():
        if part.split()[0] in upper and dtype in peaks:
            return peaks[dtype], f"datasheet {part} {dtype}"
    return None


def measure_cpu_gemm_peak(n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """Time C = A @ B for float32 n×n matrices with numpy (its BLAS, its threads), one untimed
    warm-up, and report the FASTEST of `repeats` (a peak is what the machine can do; on a shared
    machine a median measured during someone else's burst halved it here once, which put MFU
    above 100%). 2·n³ FLOPs per product. OPENBLAS_CORETYPE is reported because a forced core type
    (set on some machines) selects slower kernels."""
    import numpy as np

    if n < 1 or repeats < 1:
        raise ConfigError(f"n = {n}, repeats = {repeats}: both must be >= 1")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)  # warm-up: thread pool start, page faults
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    return {
        "flops_per_s": 2.0 * n**3 / seconds,
        "median_flops_per_s": 2.0 * n**3 / statistics.median(times),
        "n": n,
        "seconds": seconds,
        "repeats": repeats,
        "times": times,
        "dtype": "fp32",
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "blas": _numpy_blas(),
        "source": "measured fp32 GEMM (numpy)",
    }


def measure_gpu_peak(n: int = 8192, repeats: int = 5) -> dict[str, Any]:
    """Time n×n matmuls on the first JAX GPU: bf16 inputs (fp32 accumulation), fp32 at the
    default precision (TF32 tensor cores on NVIDIA) and fp32 at HIGHEST precision (true fp32).
    Each entry is {flops_per_s, seconds (median per product), n, iters (products per timing)};
    the first timing is a warm-up. The result is {} when JAX sees no GPU."""
    try:
        import jax
        import jax.numpy as jnp

        devices = jax.devices("gpu")
    except Exception:  # noqa: BLE001 - no CUDA plugin, or no device: nothing to measure
        return {}
    dev = devices[0]
    result: dict[str, Any] = {"device": getattr(dev, "device_kind", str(dev)), "n": n,
                              "source": "measured GEMM (JAX)"}
    key = jax.random.PRNGKey(0)
    variants = (("bf16", jnp.bfloat16, None), ("tf32", jnp.float32, jax.lax.Precision.DEFAULT),
                ("fp32", jnp.float32, jax.lax.Precision.HIGHEST))
    for label, dtype, precision in variants:
        a = jax.device_put(jax.random.normal(key, (n, n), dtype), dev)
        b = jax.device_put(jax.random.normal(key, (n, n), dtype), dev)
        f = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
        f(a, b).block_until_ready()  # compile
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        # one product can take ~1 ms: queue enough of them that a timing spans ~0.1 s, so
        # dispatch and the host clock do not count, and the first of them warms the clocks up
        iters = max(1, min(1000, int(0.1 / max(time.perf_counter() - t0, 1e-6))))
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for _ in range(iters):
                out = f(a, b)
            out.block_until_ready()
            times.append((time.perf_counter() - t0) / iters)
        seconds = statistics.median(times[1:])
        result[label] = {"flops_per_s": 2.0 * n**3 / seconds, "seconds": seconds, "n": n,
                         "iters": iters}
    return result


def peak_for(backend: str, dtype: str, env: dict[str, Any], measure: bool = True
             ) -> tuple[float, str]:
    """The peak FLOP/s an MFU on (backend, dtype) divides by, and where it came from.
    cuda: the datasheet figure for env["gpu_name"], else a measured GEMM peak. cpu: the measured
    fp32 GEMM peak. Measurements are cached in `env` ("cpu_gemm_peak", "gpu_gemm_peak") so they
    land in run.json; with measure=False a missing one gives (nan, "unavailable")."""
    if backend == "cuda":
        sheet = datasheet_peak(env.get("gpu_name"), dtype)
        if sheet is not None:
            return sheet
        if "gpu_gemm_peak" not in env and measure:
            env["gpu_gemm_peak"] = measure_gpu_peak()
        got = env.get("gpu_gemm_peak", {}).get(dtype)
        if got:
            return got["flops_per_s"], f"measured {dtype} GEMM (JAX)"
        return math.nan, "unavailable"
    if backend == "cpu":
        if dtype != "fp32":
            raise ConfigError(f"dtype = {dtype!r}: the CPU backend runs fp32 only")
        if "cpu_gemm_peak" not in env and measure:
            env["cpu_gemm_peak"] = measure_cpu_gemm_peak()
        got = env.get("cpu_gemm_peak")
        if got:
            return got["flops_per_s"], got["source"]
        return math.nan, "unavailable"
    raise ConfigError(f"backend = {backend!r}: unknown (allowed: cpu, cuda)")


# ---- CLI: tandem env, tandem peak --------------------------------------------------------------


def add_parser_env(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_env(args: argparse.Namespace) -> int:
    env = collect_env()
    sheet = {dt: datasheet_peak(env["gpu_name"], dt) for dt in ("bf16", "tf32", "fp32")}
    env["datasheet_peaks"] = {dt: v[0] for dt, v in sheet.items() if v} or None
    if args.json:
        print(json.dumps(env, indent=2, sort_keys=True, default=str))
        return 0
    for k, v in env.items():
        if k == "memory_bytes" and v:
            v = f"{v / 2**30:.1f} GiB"
        elif k == "datasheet_peaks" and v:
            v = ", ".join(f"{dt} {f / 1e12:.0f} TFLOP/s" for dt, f in v.items())
        elif isinstance(v, (dict, list)):
            v = json.dumps(v) if v else "-"
        print(f"{k:<16} {v if v is not None else '-'}")
    return 0


def add_parser_peak(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--size", type=int, default=2048, metavar="N",
                   help="CPU GEMM size n (n x n x n, fp32; default 2048)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median; default 5)")
    p.add_argument("--gpu-size", type=int, default=8192, metavar="N",
                   help="GPU GEMM size when a GPU is present (default 8192)")


def run_peak(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"cpu": measure_cpu_gemm_peak(args.size, args.repeats)}
    gpu = measure_gpu_peak(args.gpu_size, args.repeats) if _gpus() else {}
    if gpu:
        out["gpu"] = gpu
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True, default=str))
        return 0
    c = out["cpu"]
    note = f", OPENBLAS_CORETYPE={c['openblas_coretype']}" if c["openblas_coretype"] else ""
    print(f"cpu  fp32 GEMM n={c['n']}: {c['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"(median of {c['repeats']}, {c['seconds'] * 1e3:.1f} ms; {c['blas']}{note})")
    for label in ("bf16", "tf32", "fp32"):
        if label in gpu:
            g = gpu[label]
            print(f"gpu  {label} GEMM n={g['n']}: {g['flops_per_s'] / 1e12:.1f} TFLOP/s "
                  f"({gpu['device']})")
    return 0


__all__ = ["DATASHEET_PEAKS", "collect_env", "datasheet_peak", "measure_cpu_gemm_peak",
           "measure_gpu_peak", "peak_for", "add_parser_env", "run_env", "add_parser_peak",
           "run_peak"]
