"""The one binding to libtandem (ctypes over engine/include/tandem.h).

Everything else in the harness reaches the engine through `Model` and `read_tokens` here. A
non-OK status becomes `EngineError` carrying the engine's own message; the library never exits
the Python process. Not here: pipelined multi-process runs (harness/pipeline.py launches
`tandem-engine` under mpirun).
"""

from __future__ import annotations

import ctypes as C
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness.errors import EngineError

ABI_VERSION = 1  # must equal TD_ABI_VERSION in tandem.h

_LIB_NAMES = {"fp32": "libtandem.so", "f64": "libtandem_f64.so"}
_BWD_PART = {"BW": 0, "B": 1, "W": 2}


def library_dirs() -> list[Path]:
    """Where the shared library is looked for, in order: $TANDEM_LIB_DIR, the installed package
    (harness/_lib), then build trees of a source checkout (newest first)."""
    dirs = []
    if os.environ.get("TANDEM_LIB_DIR"):
        dirs.append(Path(os.environ["TANDEM_LIB_DIR"]))
    here = Path(__file__).resolve().parent
    dirs.append(here / "_lib")
    repo_build = here.parent / "build"
    if repo_build.is_dir():
        found = sorted(repo_build.glob("*/engine/libtandem.so"), key=lambda p: p.stat().st_mtime,
                       reverse=True)
        dirs.extend(p.parent for p in found)
    return dirs


def find_library(variant: str = "fp32") -> Path:
    name = _LIB_NAMES[variant]
    for d in library_dirs():
        if (d / name).exists():
            return d / name
    searched = ", ".join(str(d) for d in library_dirs())
    raise EngineError(f"{name} not found (searched: {searched}). HINT: `pip install .` builds "
                      "it, or set TANDEM_LIB_DIR to a directory holding it", "TD_ERR_IO")


def _declare(lib: C.CDLL) -> None:
    i32, i64, f64, vp, cp = C.c_int32, C.c_int64, C.c_double, C.c_void_p, C.c_char_p
    fp = C.POINTER(C.c_float)
    ip = C.POINTER(C.c_int32)
    dp = C.POINTER(C.c_double)
    sigs = {
        "td_abi_version": (i32, []),
        "td_real_bytes": (i32, []),
        "td_version_string": (cp, []),
        "td_status_name": (cp, [C.c_int]),
        "td_last_error": (cp, []),
        "td_model_create": (C.c_int, [C.POINTER(vp)]),
        "td_model_free": (None, [vp]),
        "td_model_last_error": (cp, [vp]),
        "td_model_set_int": (C.c_int, [vp, cp, i64]),
        "td_model_set_float": (C.c_int, [vp, cp, f64]),
        "td_model_get_int": (C.c_int, [vp, cp, C.POINTER(i64)]),
        "td_model_build": (C.c_int, [vp]),
        "td_model_profile": (C.c_int, [vp, i32, C.POINTER(cp), dp, C.POINTER(i64)]),
        "td_model_profile_reset": (C.c_int, [vp]),
        "td_model_num_params": (C.c_int, [vp, C.POINTER(i32)]),
        "td_model_param_info": (C.c_int, [vp, i32, C.POINTER(cp), C.POINTER(i32),
                                          C.POINTER(i64), C.POINTER(i64), C.POINTER(i32)]),
        "td_model_get_param": (C.c_int, [vp, fp, cp, i64]),
        "td_model_set_param": (C.c_int, [vp, cp, fp, i64]),
        "td_model_get_grad": (C.c_int, [vp, fp, cp, i64]),
        "td_model_set_grad": (C.c_int, [vp, cp, fp, i64]),
        "td_model_load_safetensors": (C.c_int, [vp, cp]),
        "td_model_save_safetensors": (C.c_int, [vp, cp]),
        "td_model_forward": (C.c_int, [vp, fp, dp, ip, ip, i32, i32]),
        "td_model_zero_grad": (C.c_int, [vp]),
        "td_model_forward_backward": (C.c_int, [vp, dp, ip, ip, i32, i32, f64]),
        "td_model_optimizer_step": (C.c_int, [vp, dp]),
        "td_model_grad_sq_sum": (C.c_int, [vp, dp]),
        "td_model_optimizer_step_with_norm": (C.c_int, [vp, f64]),
        "td_stage_forward": (C.c_int, [vp, fp, dp, i32, ip, fp, ip, i32, i32]),
        "td_stage_backward": (C.c_int, [vp, fp, i32, fp, f64, i32]),
        "td_tokens_read": (C.c_int, [C.POINTER(ip), C.POINTER(i64), cp, i64]),
        "td_model_save_grads_safetensors": (C.c_int, [vp, cp]),
        "td_op_gemm": (C.c_int, [fp, fp, fp, i32, i32, i32, i32, i32, i32]),
        "td_op_encoder_forward": (C.c_int, [fp, ip, fp, fp, i32, i32, i32, i32]),
        "td_op_encoder_backward": (C.c_int, [fp, fp, fp, ip, i32, i32, i32, i32]),
        "td_op_layernorm_forward": (C.c_int, [fp, fp, fp, fp, fp, fp, i32, i32]),
        "td_op_layernorm_backward": (C.c_int, [fp, fp, fp, fp, fp, fp, fp, fp, i32, i32]),
        "td_op_matmul_forward": (C.c_int, [fp, fp, fp, fp, i32, i32, i32]),
        "td_op_matmul_backward": (C.c_int, [fp, fp, fp, fp, fp, fp, i32, i32, i32]),
        "td_op_attention_forward": (C.c_int, [fp, fp, fp, i32, i32, i32, i32]),
        "td_op_attention_backward": (C.c_int, [fp, fp, fp, fp, i32, i32, i32, i32]),
        "td_op_gelu_forward": (C.c_int, [fp, fp, i64]),
        "td_op_gelu_backward": (C.c_int, [fp, fp, fp, i64]),
        "td_op_softmax_crossentropy_forward": (C.c_int, [fp, fp, fp, ip, i32, i32]),
        "td_op_softmax_crossentropy_backward": (C.c_int, [fp, fp, ip, f64, i32, i32]),
        "td_free": (None, [vp]),
        "td_model_save_checkpoint": (C.c_int, [vp, cp, i64]),
        "td_model_load_checkpoint": (C.c_int, [vp, cp, C.POINTER(i64)]),
        "td_model_find_nonfinite": (C.c_int, [vp, C.POINTER(cp), C.POINTER(i32)]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


# OpenMP threads that spin at barriers turn a shared machine's contention into collapse: with
# another process on one of 2 cores, a step of a small model took 2.9 s spinning vs 87 ms with
# passive waiting (measured here). Passive waiting has its own price on an idle machine: every
# one of a step's ~100 parallel regions wakes sleeping threads (a tiny model's step: 5.8 ms
# passive vs 3.5 ms with a short spin). So: passive by default, plus a short spin
# (GOMP_SPINCOUNT, which libgomp honours over the passive policy) only while the threads fit the
# cores nobody else is using. libgomp reads both when it loads, so they are chosen before the
# engine library is; an explicit setting in the environment wins.
SPIN_COUNT = "1000"  # libgomp spins, ~20 us here: covers the gaps between a step's regions
_USER_SPINCOUNT = "GOMP_SPINCOUNT" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cores_available() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cores_busy_elsewhere(samples: int = 5) -> int:
    """Cores other processes keep busy now: the larger of the 1-minute load average (rounded)
    and the fewest runnable tasks seen in `samples` reads of /proc/loadavg, less this one."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return 0
    running = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            break
        time.sleep(0.002)
    return max(int(load1 + 0.5), min(running) if running else 0)


def spin_env(total_threads: int) -> dict[str, str]:
    """The OpenMP wait setting for `total_threads` engine threads (all ranks together):
    {"GOMP_SPINCOUNT": SPIN_COUNT} when they fit the free cores, else {} (passive only).
    Empty when the caller set GOMP_SPINCOUNT themselves (theirs stands)."""
    if _USER_SPINCOUNT:
        return {}
    free = cores_available() - cores_busy_elsewhere()
    return {"GOMP_SPINCOUNT": SPIN_COUNT} if total_threads <= free else {}


def _library_threads() -> int:
    n = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(n) if n.isdigit() and int(n) > 0 else cores_available()


def libgomp_loaded() -> bool:
    """Whether libgomp is already mapped into this process (then the wait settings chosen here
    come too late: libgomp read its environment when it loaded)."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


# What load_library found and chose: recorded for run notes.
WAIT_POLICY: dict[str, object] = {}


@lru_cache(maxsize=None)
def load_library(variant: str = "fp32") -> C.CDLL:
    path = find_library(variant)
    if not WAIT_POLICY:
        preloaded = libgomp_loaded()
        if not preloaded:
            os.environ.update(spin_env(_library_threads()))
        WAIT_POLICY.update(libgomp_preloaded=preloaded,
                           OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"),
                           GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT"))
    try:
        lib = C.CDLL(str(path))
    except OSError as exc:
        raise EngineError(f"cannot load {path}: {exc}", "TD_ERR_IO") from exc
    _declare(lib)
    abi = lib.td_abi_version()
    if abi != ABI_VERSION:
        raise EngineError(f"{path} has ABI version {abi}, this harness speaks {ABI_VERSION}. "
                          "HINT: rebuild and reinstall (`pip install .`)", "TD_ERR_STATE")
    return lib


def version(variant: str = "fp32") -> str:
    return load_library(variant).td_version_string().decode()


def _fptr(a: np.ndarray):
    return a.ctypes.data_as(C.POINTER(C.c_float))


def _iptr(a: np.ndarray):
    return a.ctypes.data_as(C.POINTER(C.c_int32))


def _ids(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise EngineError(f"{what} must be a (B, T) array, got shape {a.shape}", "TD_ERR_ARG")
    if not np.issubdtype(a.dtype, np.integer):
        raise EngineError(f"{what} must hold integer token ids, got dtype {a.dtype}", "TD_ERR_ARG")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise EngineError(f"{what} holds ids outside int32: [{a.min()}, {a.max()}]", "TD_ERR_RANGE")
    return np.ascontiguousarray(a, dtype=np.int32)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    numel: int
    decayed: bool


class Model:
    """One engine model (or one pipeline stage) with its parameters, gradients and AdamW state.

    Configuration keys are those of td_model_set_int/float (n_layer, n_embd, n_head,
    vocab_size, n_positions, seq_len, batch_size, threads, stage, stages, layer_begin,
    layer_end, slots, split_backward; lr, beta1, beta2, eps, weight_decay, grad_clip), and the
    model family: family "gpt2" (default) or "llama" with n_kv_head, ffn_dim, rope_theta and
    norm_eps (a Llama model runs on one CPU stage).
    variant="f64" loads the float64-kernel build used by the finite-difference tests.
    """

    _INT_KEYS = {"n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "seq_len",
                 "batch_size", "threads", "stage", "stages", "layer_begin", "layer_end", "slots",
                 "split_backward", "backend", "bf16", "profile", "family", "n_kv_head",
                 "ffn_dim"}
    _BACKENDS = {"cpu": 0, "cuda": 1}
    _FAMILIES = {"gpt2": 0, "llama": 1}

    def __init__(self, variant: str = "fp32", **config):
        self._lib = load_library(variant)
        self._h = C.c_void_p()
        st = self._lib.td_model_create(C.byref(self._h))
        if st:
            raise EngineError(self._lib.td_last_error().decode(), self._status(st))
        try:
            for key, value in config.items():
                if value is None:
                    continue
                if key == "backend" and isinstance(value, str):
                    if value not in self._BACKENDS:
                        raise EngineError(f"backend={value!r}: unknown (allowed: cpu, cuda)",
                                          "TD_ERR_CONFIG")
                    value = self._BACKENDS[value]
                if key == "family" and isinstance(value, str):
                    if value not in self._FAMILIES:
                        raise EngineError(f"family={value!r}: unknown (allowed: gpt2, llama)",
                                          "TD_ERR_CONFIG")
                    value = self._FAMILIES[value]
                if key == "dtype":  # "fp32" | "bf16"
                    if value not in ("fp32", "bf16"):
                        raise EngineError(f"dtype={value!r}: unknown (allowed: fp32, bf16)",
                                          "TD_ERR_CONFIG")
                    key, value = "bf16", int(value == "bf16")
                if key in self._INT_KEYS:
                    if isinstance(value, bool):
                        value = int(value)
                    if not isinstance(value, (int, np.integer)):
                        raise EngineError(f"config key {key} must be an integer, got {value!r}",
                                          "TD_ERR_CONFIG")
                    self._check(self._lib.td_model_set_int(self._h, key.encode(), int(value)))
                else:
                    if not isinstance(value, (int, float, np.floating, np.integer)):
                        raise EngineError(f"config key {key} must be a number, got {value!r}",
                                          "TD_ERR_CONFIG")
                    self._check(self._lib.td_model_set_float(self._h, key.encode(), float(value)))
            self._check(self._lib.td_model_build(self._h))
        except Exception:
            self.close()
            raise
        self.config = dict(config)
        self.table = self._read_table()
        self._by_name = {p.name: p for p in self.table}

    # -- plumbing ---------------------------------------------------------------------------
    def _status(self, st: int) -> str:
        return self._lib.td_status_name(st).decode()

    def _check(self, st: int) -> None:
        if st:
            msg = self._lib.td_model_last_error(self._h).decode() if self._h else \
                self._lib.td_last_error().decode()
            raise EngineError(msg, self._status(st))

    def close(self) -> None:
        if getattr(self, "_h", None):
            self._lib.td_model_free(self._h)
            self._h = C.c_void_p()

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get_int(self, key: str) -> int:
        out = C.c_int64()
        self._check(self._lib.td_model_get_int(self._h, key.encode(), C.byref(out)))
        return out.value

    def profile(self) -> dict[str, tuple[float, int]]:
        """The CPU per-phase profile (needs profile=1): phase -> (wall seconds, calls), summed
        since build or the last profile_reset, in the engine's phase order."""
        out, i = {}, 0
        name, sec, calls = C.c_char_p(), C.c_double(), C.c_int64()
        while self._lib.td_model_profile(self._h, i, C.byref(name), C.byref(sec),
                                         C.byref(calls)) == 0:
            out[name.value.decode()] = (sec.value, calls.value)
            i += 1
        return out

    def profile_reset(self) -> None:
        self._check(self._lib.td_model_profile_reset(self._h))

    def set_float(self, key: str, value: float) -> None:
        self._check(self._lib.td_model_set_float(self._h, key.encode(), float(value)))

    # -- parameter table --------------------------------------------------------------------
    def _read_table(self) -> list[ParamInfo]:
        n = C.c_int32()
        self._check(self._lib.td_model_num_params(self._h, C.byref(n)))
        table = []
        for i in range(n.value):
            name, ndim, numel, dec = C.c_char_p(), C.c_int32(), C.c_int64(), C.c_int32()
            shape = (C.c_int64 * 4)()
            self._check(self._lib.td_model_param_info(self._h, i, C.byref(name), C.byref(ndim),
                                                      shape, C.byref(numel), C.byref(dec)))
            table.append(ParamInfo(name.value.decode(), tuple(shape[: ndim.value]), numel.value,
                                   bool(dec.value)))
        return table

    def _info(self, name: str) -> ParamInfo:
        if name not in self._by_name:
            raise EngineError(f"no parameter '{name}' on this model/stage", "TD_ERR_ARG")
        return self._by_name[name]

    def get_param(self, name: str) -> np.ndarray:
        p = self._info(name)
        out = np.empty(p.shape, dtype=np.float32)
        self._check(self._lib.td_model_get_param(self._h, _fptr(out), name.encode(), p.numel))
        return out

    def get_grad(self, name: str) -> np.ndarray:
        p = self._info(name)
        out = np.empty(p.shape, dtype=np.float32)
        self._check(self._lib.td_model_get_grad(self._h, _fptr(out), name.encode(), p.numel))
        return out

    def _set(self, fn, name: str, value) -> None:
        p = self._info(name)
        a = np.ascontiguousarray(value, dtype=np.float32)
        if a.shape != p.shape:
            raise EngineError(f"'{name}' has shape {p.shape}, got an array of shape {a.shape}",
                              "TD_ERR_ARG")
        self._check(fn(self._h, name.encode(), _fptr(a), p.numel))

    def set_param(self, name: str, value) -> None:
        self._set(self._lib.td_model_set_param, name, value)

    def set_grad(self, name: str, value) -> None:
        self._set(self._lib.td_model_set_grad, name, value)

    def params(self) -> dict[str, np.ndarray]:
        return {p.name: self.get_param(p.name) for p in self.table}

    def grads(self) -> dict[str, np.ndarray]:
        return {p.name: self.get_grad(p.name) for p in self.table}

    def set_params(self, params: dict) -> None:
        missing = [p.name for p in self.table if p.name not in params]
        if missing:
            raise EngineError(f"set_params: missing {missing[:5]}", "TD_ERR_ARG")
        for p in self.table:
            self.set_param(p.name, params[p.name])

    def load_safetensors(self, path) -> None:
        self._check(self._lib.td_model_load_safetensors(self._h, str(path).encode()))

    def save_safetensors(self, path) -> None:
        self._check(self._lib.td_model_save_safetensors(self._h, str(path).encode()))

    # -- training state (checkpoints) -------------------------------------------------------
    def save_checkpoint(self, path, data_position: int = 0) -> None:
        """Parameters, AdamW moments, step and `data_position` to one safetensors file,
        atomically (td_model_save_checkpoint)."""
        self._check(self._lib.td_model_save_checkpoint(self._h, str(path).encode(),
                                                       int(data_position)))

    def load_checkpoint(self, path) -> int:
        """Restore a checkpoint of this model/stage; returns its data position. A truncated or
        mismatched file raises EngineError and leaves the model as it was."""
        pos = C.c_int64()
        self._check(self._lib.td_model_load_checkpoint(self._h, str(path).encode(),
                                                       C.byref(pos)))
        return pos.value

    def find_nonfinite(self) -> tuple[str, str] | None:
        """The first tensor (table order) whose gradient, else whose parameter, holds a NaN or
        inf: ("gradient" | "parameter", name); None when everything is finite."""
        name, what = C.c_char_p(), C.c_int32()
        self._check(self._lib.td_model_find_nonfinite(self._h, C.byref(name), C.byref(what)))
        if not what.value:
            return None
        return ("gradient" if what.value == 1 else "parameter", name.value.decode())

    # -- one-stage passes -------------------------------------------------------------------
    def forward(self, tokens, targets=None, logits: bool = True):
        """Returns (logits (B, T, V) float32 or None, loss or None)."""
        x = _ids(tokens, "tokens")
        y = None if targets is None else _ids(targets, "targets")
        if y is not None and y.shape != x.shape:
            raise EngineError(f"targets shape {y.shape} != tokens shape {x.shape}", "TD_ERR_ARG")
        B, T = x.shape
        V = self.config["vocab_size"]
        out = np.empty((B, T, V), dtype=np.float32) if logits else None
        loss = C.c_double(float("nan"))
        self._check(self._lib.td_model_forward(
            self._h, _fptr(out) if logits else None, C.byref(loss), _iptr(x),
            _iptr(y) if y is not None else None, B, T))
        return out, (loss.value if y is not None else None)

    def zero_grad(self) -> None:
        self._check(self._lib.td_model_zero_grad(self._h))

    def forward_backward(self, tokens, targets, grad_scale: float = 1.0) -> float:
        x, y = _ids(tokens, "tokens"), _ids(targets, "targets")
        if y.shape != x.shape:
            raise EngineError(f"targets shape {y.shape} != tokens shape {x.shape}", "TD_ERR_ARG")
        loss = C.c_double()
        self._check(self._lib.td_model_forward_backward(self._h, C.byref(loss), _iptr(x),
                                                        _iptr(y), x.shape[0], x.shape[1],
                                                        float(grad_scale)))
        return loss.value

    def optimizer_step(self) -> float:
        norm = C.c_double()
        self._check(self._lib.td_model_optimizer_step(self._h, C.byref(norm)))
        return norm.value

    def grad_sq_sum(self) -> float:
        out = C.c_double()
        self._check(self._lib.td_model_grad_sq_sum(self._h, C.byref(out)))
        return out.value

    def optimizer_step_with_norm(self, grad_norm: float) -> None:
        self._check(self._lib.td_model_optimizer_step_with_norm(self._h, float(grad_norm)))

    def train_step(self, tokens_MBT, targets_MBT) -> tuple[float, float]:
        """One optimizer step over M equal micro-batches: returns (mean loss, pre-clip norm)."""
        x, y = np.asarray(tokens_MBT), np.asarray(targets_MBT)
        if x.ndim == 2:
            x, y = x[None], y[None]
        M = x.shape[0]
        self.zero_grad()
        losses = [self.forward_backward(x[i], y[i], 1.0 / M) for i in range(M)]
        norm = self.optimizer_step()
        return float(np.mean(losses)), norm

    # -- stage passes (pipeline) ------------------------------------------------------------
    def stage_forward(self, slot: int, tokens=None, inputs=None, targets=None):
        """Returns (out (B, T, C) or None on the last stage, loss or None)."""
        x = None if tokens is None else _ids(tokens, "tokens")
        y = None if targets is None else _ids(targets, "targets")
        h = None if inputs is None else np.ascontiguousarray(inputs, dtype=np.float32)
        shape = (x if x is not None else h).shape
        B, T = shape[0], shape[1]
        is_last = self.get_int("stage") == self.get_int("stages") - 1
        out = None if is_last else np.empty((B, T, self.config["n_embd"]), dtype=np.float32)
        loss = C.c_double(float("nan"))
        self._check(self._lib.td_stage_forward(
            self._h, _fptr(out) if out is not None else None, C.byref(loss), slot,
            _iptr(x) if x is not None else None, _fptr(h) if h is not None else None,
            _iptr(y) if y is not None else None, B, T))
        return out, (loss.value if is_last and y is not None else None)

    def stage_backward(self, slot: int, dout=None, grad_scale: float = 1.0, part: str = "BW",
                       shape: tuple[int, int] | None = None):
        """Backward of `slot`; part "BW" (fused), "B" (input gradient) or "W" (weights).
        Returns the gradient of the stage input (B, T, C) for BW/B on non-first stages."""
        is_first = self.get_int("stage") == 0
        d = None if dout is None else np.ascontiguousarray(dout, dtype=np.float32)
        din = None
        if part != "W" and not is_first:
            if shape is None and d is None:
                raise EngineError("stage_backward needs `shape` (B, T) on the last stage",
                                  "TD_ERR_ARG")
            B, T = shape if shape is not None else d.shape[:2]
            din = np.empty((B, T, self.config["n_embd"]), dtype=np.float32)
        self._check(self._lib.td_stage_backward(
            self._h, _fptr(din) if din is not None else None, slot,
            _fptr(d) if d is not None else None, float(grad_scale), _BWD_PART[part]))
        return din


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class Ops:
    """Each engine kernel on numpy arrays (td_op_* in tandem.h): what op-level parity compares
    with jax.vjp. Inputs are copied to contiguous fp32; outputs are fresh arrays. Weight
    gradients start from zero (the kernels accumulate)."""

    def __init__(self):
        self._lib = load_library()

    def _call(self, name: str, *args) -> None:
        st = getattr(self._lib, name)(*args)
        if st:
            raise EngineError(self._lib.td_last_error().decode(),
                              self._lib.td_status_name(st).decode())

    def gemm(self, A, B, transA=False, transB=False):
        A, B = _f32(A), _f32(B)
        M, K = (A.shape[1], A.shape[0]) if transA else A.shape
        N = B.shape[0] if transB else B.shape[1]
        out = np.empty((M, N), np.float32)
        self._call("td_op_gemm", _fptr(out), _fptr(A), _fptr(B), M, N, K, int(transA),
                   int(transB), 0)
        return out

    def encoder_forward(self, tokens_BT, wte_VC, wpe_TC):
        x, wte, wpe = _ids(tokens_BT, "tokens"), _f32(wte_VC), _f32(wpe_TC)
        (B, T), (V, Cc) = x.shape, wte.shape
        out = np.empty((B, T, Cc), np.float32)
        self._call("td_op_encoder_forward", _fptr(out), _iptr(x), _fptr(wte), _fptr(wpe), B, T,
                   Cc, V)
        return out

    def encoder_backward(self, dout_BTC, tokens_BT, vocab_size: int, n_positions: int):
        d, x = _f32(dout_BTC), _ids(tokens_BT, "tokens")
        B, T, Cc = d.shape
        dwte = np.zeros((vocab_size, Cc), np.float32)
        dwpe = np.zeros((n_positions, Cc), np.float32)
        self._call("td_op_encoder_backward", _fptr(dwte), _fptr(dwpe), _fptr(d), _iptr(x), B, T,
                   Cc, vocab_size)
        return dwte, dwpe

    def layernorm_forward(self, x, w, b):
        x, w, b = _f32(x), _f32(w), _f32(b)
        Cc = x.shape[-1]
        N = x.size // Cc
        out = np.empty_like(x)
        mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
        self._call("td_op_layernorm_forward", _fptr(out), _fptr(mean), _fptr(rstd), _fptr(x),
                   _fptr(w), _fptr(b), N, Cc)
        return out, mean, rstd

    def layernorm_backward(self, dout, x, w, mean, rstd):
        d, x, w, mean, rstd = map(_f32, (dout, x, w, mean, rstd))
        Cc = x.shape[-1]
        N = x.size // Cc
        dx, dw, db = np.empty_like(x), np.zeros(Cc, np.float32), np.zeros(Cc, np.float32)
        self._call("td_op_layernorm_backward", _fptr(dx), _fptr(dw), _fptr(db), _fptr(d),
                   _fptr(x), _fptr(w), _fptr(mean), _fptr(rstd), N, Cc)
        return dx, dw, db

    def matmul_forward(self, x, w, bias=None):
        x, w = _f32(x), _f32(w)
        IC, OC = w.shape
        N = x.size // IC
        out = np.empty(x.shape[:-1] + (OC,), np.float32)
        b = None if bias is None else _f32(bias)
        self._call("td_op_matmul_forward", _fptr(out), _fptr(x), _fptr(w),
                   _fptr(b) if b is not None else None, N, IC, OC)
        return out

    def matmul_backward(self, dout, x, w):
        d, x, w = _f32(dout), _f32(x), _f32(w)
        IC, OC = w.shape
        N = x.size // IC
        dx, dw, db = np.empty_like(x), np.zeros_like(w), np.zeros(OC, np.float32)
        self._call("td_op_matmul_backward", _fptr(dx), _fptr(dw), _fptr(db), _fptr(d), _fptr(x),
                   _fptr(w), N, IC, OC)
        return dx, dw, db

    def attention_forward(self, qkv_BT3C, n_head: int):
        qkv = _f32(qkv_BT3C)
        B, T, C3 = qkv.shape
        Cc = C3 // 3
        out = np.empty((B, T, Cc), np.float32)
        att = np.empty((B, n_head, T, T), np.float32)
        self._call("td_op_attention_forward", _fptr(out), _fptr(att), _fptr(qkv), B, T, Cc,
                   n_head)
        return out, att

    def attention_backward(self, dout_BTC, qkv_BT3C, att, n_head: int):
        d, qkv, att = _f32(dout_BTC), _f32(qkv_BT3C), _f32(att)
        B, T, Cc = d.shape
        dqkv = np.empty_like(qkv)
        self._call("td_op_attention_backward", _fptr(dqkv), _fptr(d), _fptr(qkv), _fptr(att), B,
                   T, Cc, n_head)
        return dqkv

    def gelu_forward(self, x):
        x = _f32(x)
        out = np.empty_like(x)
        self._call("td_op_gelu_forward", _fptr(out), _fptr(x), x.size)
        return out

    def gelu_backward(self, x, dout):
        x, d = _f32(x), _f32(dout)
        dx = np.empty_like(x)
        self._call("td_op_gelu_backward", _fptr(dx), _fptr(x), _fptr(d), x.size)
        return dx

    def softmax_crossentropy_forward(self, logits, targets):
        z, y = _f32(logits), np.ascontiguousarray(targets, dtype=np.int32)
        V = z.shape[-1]
        N = z.size // V
        probs, losses = np.empty_like(z), np.empty(z.shape[:-1], np.float32)
        self._call("td_op_softmax_crossentropy_forward", _fptr(probs), _fptr(losses), _fptr(z),
                   _iptr(y), N, V)
        return probs, losses

    def softmax_crossentropy_backward(self, probs, targets, dloss: float):
        p, y = _f32(probs), np.ascontiguousarray(targets, dtype=np.int32)
        V = p.shape[-1]
        N = p.size // V
        d = np.empty_like(p)
        self._call("td_op_softmax_crossentropy_backward", _fptr(d), _fptr(p), _iptr(y),
                   float(dloss), N, V)
        return d

    # -- the Llama family's ops: td_op_real buffers (float32 here, float64 in libtandem_f64) --
    @classmethod
    def for_variant(cls, variant: str) -> "Ops":
        """Ops on the "fp32" or "f64" library; only the Llama ops run on "f64" (the
        finite-difference tests use it), their arrays then being float64."""
        ops = cls.__new__(cls)
        ops._lib = load_library(variant)
        return ops

    _LLAMA_SIGS = {  # r: a td_op_real buffer, i32/i64/f64: scalars
        "td_op_rmsnorm_forward": "r r r r i32 i32 f64",
        "td_op_rmsnorm_backward": "r r r r r r i32 i32",
        "td_op_rope_forward": "r r i32 i32 i32 i32 f64",
        "td_op_rope_backward": "r r i32 i32 i32 i32 f64",
        "td_op_swiglu_forward": "r r r i64",
        "td_op_swiglu_backward": "r r r r r i64",
        "td_op_gqa_attention_forward": "r r r r r i32 i32 i32 i32 i32",
        "td_op_gqa_attention_backward": "r r r r r r r r i32 i32 i32 i32 i32",
    }

    def _real(self) -> type:
        return np.float64 if self._lib.td_real_bytes() == 8 else np.float32

    def _llama(self, name: str, *args) -> None:
        fn = getattr(self._lib, name)
        if fn.argtypes is None:
            kinds = {"r": C.c_void_p, "i32": C.c_int32, "i64": C.c_int64, "f64": C.c_double}
            fn.restype, fn.argtypes = C.c_int, [kinds[k] for k in self._LLAMA_SIGS[name].split()]
        conv = [a.ctypes.data_as(C.c_void_p) if isinstance(a, np.ndarray) else a for a in args]
        self._call(name, *conv)

    def _arr(self, a) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=self._real())

    def rmsnorm_forward(self, x, w, eps: float):
        """(out, rstd (N,)) for x (..., C)."""
        x, w = self._arr(x), self._arr(w)
        Cc = x.shape[-1]
        N = x.size // Cc
        out, rstd = np.empty_like(x), np.empty(N, x.dtype)
        self._llama("td_op_rmsnorm_forward", out, rstd, x, w, N, Cc, float(eps))
        return out, rstd

    def rmsnorm_backward(self, dout, x, w, rstd):
        """(dx, dw)."""
        d, x, w, rstd = map(self._arr, (dout, x, w, rstd))
        Cc = x.shape[-1]
        N = x.size // Cc
        dx, dw = np.empty_like(x), np.zeros(Cc, x.dtype)
        self._llama("td_op_rmsnorm_backward", dx, dw, d, x, w, rstd, N, Cc)
        return dx, dw

    def rope_forward(self, x_BTNH, theta: float):
        x = self._arr(x_BTNH)
        B, T, NH, HS = x.shape
        out = np.empty_like(x)
        self._llama("td_op_rope_forward", out, x, B, T, NH, HS, float(theta))
        return out

    def rope_backward(self, dout_BTNH, theta: float):
        d = self._arr(dout_BTNH)
        B, T, NH, HS = d.shape
        dx = np.empty_like(d)
        self._llama("td_op_rope_backward", dx, d, B, T, NH, HS, float(theta))
        return dx

    def swiglu_forward(self, gate, up):
        g, u = self._arr(gate), self._arr(up)
        if g.shape != u.shape:
            raise EngineError(f"swiglu: gate {g.shape} and up {u.shape} differ", "TD_ERR_ARG")
        out = np.empty_like(g)
        self._llama("td_op_swiglu_forward", out, g, u, g.size)
        return out

    def swiglu_backward(self, dout, gate, up):
        """(dgate, dup)."""
        d, g, u = self._arr(dout), self._arr(gate), self._arr(up)
        dg, du = np.empty_like(g), np.empty_like(u)
        self._llama("td_op_swiglu_backward", dg, du, d, g, u, g.size)
        return dg, du

    def gqa_attention_forward(self, q_BTNH, k_BTKH, v_BTKH):
        """(out (B, T, NH, HS), att (B, NH, T, T))."""
        q, k, v = self._arr(q_BTNH), self._arr(k_BTKH), self._arr(v_BTKH)
        B, T, NH, HS = q.shape
        NKV = k.shape[2]
        if k.shape != (B, T, NKV, HS) or v.shape != k.shape:
            raise EngineError(f"gqa_attention: q {q.shape}, k {k.shape}, v {v.shape} do not "
                              "fit (B, T, NH, HS) and (B, T, NKV, HS)", "TD_ERR_ARG")
        out, att = np.empty_like(q), np.empty((B, NH, T, T), q.dtype)
        self._llama("td_op_gqa_attention_forward", out, att, q, k, v, B, T, NH, NKV, HS)
        return out, att

    def gqa_attention_backward(self, dout_BTNH, q_BTNH, k_BTKH, v_BTKH, att):
        """(dq, dk, dv)."""
        d, q, k, v, att = map(self._arr, (dout_BTNH, q_BTNH, k_BTKH, v_BTKH, att))
        B, T, NH, HS = q.shape
        NKV = k.shape[2]
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        self._llama("td_op_gqa_attention_backward", dq, dk, dv, d, q, k, v, att, B, T, NH, NKV,
                    HS)
        return dq, dk, dv


def read_tokens(path, vocab_size: int = 0) -> np.ndarray:
    """Read a token shard through the engine's own reader (the same checks the engine applies)."""
    lib = load_library()
    ptr = C.POINTER(C.c_int32)()
    count = C.c_int64()
    st = lib.td_tokens_read(C.byref(ptr), C.byref(count), str(path).encode(), int(vocab_size))
    if st:
        raise EngineError(lib.td_last_error().decode(), lib.td_status_name(st).decode())
    try:
        return np.ctypeslib.as_array(ptr, shape=(count.value,)).copy() if count.value else \
            np.zeros(0, dtype=np.int32)
    finally:
        lib.td_free(ptr)
