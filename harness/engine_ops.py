"""Each engine kernel on numpy arrays (td_op_* in tandem.h), for op-level parity and kernel benches.

The GPT-2 ops run on the float32 library; the Llama family's ops run on either build (float64 in
libtandem_f64, for the finite-difference tests). Not here: models (harness/engine.py).
"""

from __future__ import annotations

import ctypes as C

import numpy as np

from harness.engine_lib import _fptr, _ids, _iptr, load_library
from harness.errors import EngineError


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
