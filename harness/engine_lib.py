"""Finding and loading libtandem: its search path, its ctypes signatures (tandem.h), the ABI check.

load_library applies the OpenMP wait setting of harness/omp_wait.py first (libgomp reads it when
it loads) and records what it chose in WAIT_POLICY. The argument converters here are what the
wrappers of harness/engine.py (Model) and harness/engine_ops.py (Ops) share. Not here: any
wrapper of a model or an op.
"""

from __future__ import annotations

import ctypes as C
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness.errors import EngineError
from harness.omp_wait import _library_threads, libgomp_loaded, spin_env

ABI_VERSION = 1  # must equal TD_ABI_VERSION in tandem.h

_LIB_NAMES = {"fp32": "libtandem.so", "f64": "libtandem_f64.so"}


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
