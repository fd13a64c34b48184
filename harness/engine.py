"""The one binding to libtandem (ctypes over engine/include/tandem.h).

Everything else in the harness reaches the engine through `Model` and `read_tokens` here. A
non-OK status becomes `EngineError` carrying the engine's own message; the library never exits
the Python process. Not here: pipelined multi-process runs (harness/pipeline.py launches
`tandem-engine` under mpirun).

Its parts: harness/engine_lib.py finds and loads the library (with harness/omp_wait.py's OpenMP
wait setting), harness/engine_ops.py wraps the single ops (`Ops`); every name they define that
callers use is importable from here too.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass

import numpy as np

from harness.engine_lib import ABI_VERSION, WAIT_POLICY  # noqa: F401  (re-exported)
from harness.engine_lib import _fptr, _ids, _iptr, load_library
from harness.engine_lib import find_library, library_dirs, version  # noqa: F401  (re-exported)
from harness.engine_ops import Ops  # noqa: F401  (re-exported)
from harness.errors import EngineError
from harness.omp_wait import SPIN_COUNT, _USER_SPINCOUNT, spin_env  # noqa: F401  (re-exported)
from harness.omp_wait import cores_available, cores_busy_elsewhere  # noqa: F401  (re-exported)
from harness.omp_wait import libgomp_loaded  # noqa: F401  (re-exported)

_BWD_PART = {"BW": 0, "B": 1, "W": 2}


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
    norm_eps (a Llama model runs on the CPU, as any stage).
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
