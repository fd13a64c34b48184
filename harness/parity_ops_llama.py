"""The op tier of `tandem parity` for the Llama family: each of its kernels (td_op_rmsnorm_*,
td_op_rope_*, td_op_swiglu_*, td_op_gqa_attention_*, and the GEMM in the (out, in) layout the
public weights use), forward and every input gradient, against reference/ops.py and jax.vjp on
seeded random inputs; then one Llama block composed from those same entry points (forward and a
hand-written backward) against jax.vjp of reference.llama.block, which checks the layouts
between the ops (the (B, T, C) projections viewed as heads, the residual adds, which gradients
sum). Yields (name, engine array, reference array) like harness/parity_ops.py; tolerances and
output are harness/parity.py's. Not here: stage passes through the model ABI (the engine's Llama
model passes do not exist yet).

Inputs are large enough to tell the variants of each op apart: RoPE at T >= 2 with angles far
from 0 (a wrong theta, or the interleaved pairing, moves most elements), attention scores far
from uniform (a missing 1/sqrt(HS) shows), and n_kv_head < n_head whenever the shape allows
(a wrong query-to-kv-head map shows).
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from harness.engine import Ops
from reference import llama, ops

Comparison = tuple[str, np.ndarray, np.ndarray]


def _normal(rng, *shape) -> np.ndarray:
    return rng.normal(0.0, 1.0, shape).astype(np.float32)


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float32)


@functools.partial(jax.jit, static_argnums=3)
def _vjp_rmsnorm(x, w, dout, eps):
    out, vjp = jax.vjp(lambda a, b: ops.rmsnorm(a, b, eps), x, w)
    return out, vjp(dout)


@functools.partial(jax.jit, static_argnums=2)
def _vjp_rope(x, dout, theta):
    out, vjp = jax.vjp(lambda a: ops.rope(a, theta), x)
    return out, vjp(dout)[0]


@jax.jit
def _vjp_swiglu(gate, up, dout):
    out, vjp = jax.vjp(ops.swiglu, gate, up)
    return out, vjp(dout)


@jax.jit
def _vjp_gqa(q, k, v, dout):
    out, vjp = jax.vjp(ops.gqa_attention, q, k, v)
    return out, vjp(dout)


def kernels(model, B: int, T: int, seed: int, threads: int = 1) -> Iterator[Comparison]:
    """Every Llama kernel at micro-batch (B, T) of `model`'s shape (a LlamaConfig or a
    harness.config.ModelConfig of family "llama": n_embd, n_head, n_kv_head, ffn_dim,
    rope_theta, norm_eps)."""
    rng = np.random.default_rng([seed, 5, T])
    C, NH, NKV, F = model.n_embd, model.n_head, model.n_kv_head, model.ffn_dim
    HS = C // NH
    theta, eps = float(model.rope_theta), float(model.norm_eps)
    k = Ops()

    # the projections: x @ W^T with W stored (out, in), as the public weights are
    for name, IN, OUT in (("q_proj", C, C), ("kv_proj", C, NKV * HS), ("gate_proj", C, F),
                          ("down_proj", F, C)):
        x, w = _normal(rng, B * T, IN), 0.2 * _normal(rng, OUT, IN)
        yield f"linear[{name}].out", k.gemm(x, w, False, True), _np(jnp.asarray(x) @ w.T)

    x = 2.0 * _normal(rng, B, T, C) + 0.5
    w = 1.0 + 0.1 * _normal(rng, C)
    dout = _normal(rng, B, T, C)
    out, rstd = k.rmsnorm_forward(x, w, eps)
    dx, dw = k.rmsnorm_backward(dout, x, w, rstd)
    want, (g_x, g_w) = _vjp_rmsnorm(x, w, dout, eps)
    yield "rmsnorm.out", out, _np(want)
    yield "rmsnorm.dx", dx, _np(g_x)
    yield "rmsnorm.dw", dw, _np(g_w)

    for heads, what in ((NH, "q"), (NKV, "k")):
        x, dout = _normal(rng, B, T, heads, HS), _normal(rng, B, T, heads, HS)
        want, g_x = _vjp_rope(x, dout, theta)
        yield f"rope[{what}].out", k.rope_forward(x, theta), _np(want)
        yield f"rope[{what}].dx", k.rope_backward(dout, theta), _np(g_x)

    gate, up = 2.0 * _normal(rng, B, T, F), _normal(rng, B, T, F)
    dout = _normal(rng, B, T, F)
    want, (g_gate, g_up) = _vjp_swiglu(gate, up, dout)
    dgate, dup = k.swiglu_backward(dout, gate, up)
    yield "swiglu.out", k.swiglu_forward(gate, up), _np(want)
    yield "swiglu.dgate", dgate, _np(g_gate)
    yield "swiglu.dup", dup, _np(g_up)

    q = 2.0 * _normal(rng, B, T, NH, HS)
    kk, v = 2.0 * _normal(rng, B, T, NKV, HS), _normal(rng, B, T, NKV, HS)
    dout = _normal(rng, B, T, NH, HS)
    out, att = k.gqa_attention_forward(q, kk, v)
    dq, dk, dv = k.gqa_attention_backward(dout, q, kk, v, att)
    want, (g_q, g_k, g_v) = _vjp_gqa(q, kk, v, dout)
    yield "gqa_attention.out", out, _np(want)
    yield "gqa_attention.dq", dq, _np(g_q)
    yield "gqa_attention.dk", dk, _np(g_k)
    yield "gqa_attention.dv", dv, _np(g_v)


def _llama_config(model) -> llama.LlamaConfig:
    return llama.LlamaConfig(1, model.n_embd, model.n_head, model.n_kv_head, model.vocab_size,
                             model.ffn_dim, max(model.n_positions, 1), float(model.rope_theta),
                             float(model.norm_eps))


@functools.partial(jax.jit, static_argnums=3)
def _vjp_block(p, x, dout, cfg):
    out, vjp = jax.vjp(lambda p_, x_: llama.block(p_, x_, cfg), p, x)
    return out, vjp(dout)


def composed_block(model, B: int, T: int, seed: int, threads: int = 1
                   ) -> Iterator[Comparison]:
    """One Llama block from the td_op_* kernels: out, dx and the 9 weight gradients (keyed by
    their public names without `model.layers.{i}.`) against jax.vjp of reference.llama.block."""
    cfg = _llama_config(model)
    rng = np.random.default_rng([seed, 6, T])
    C, NH, NKV, F = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_dim
    HS, N = C // NH, B * T
    k = Ops()
    shapes = {name.removeprefix("model.layers.0."): s for name, s in
              llama.param_shapes(cfg).items() if name.startswith("model.layers.0.")}
    p = {n: (1.0 + 0.1 * _normal(rng, *s)) if len(s) == 1 else 0.2 * _normal(rng, *s)
         for n, s in shapes.items()}
    x, dout = _normal(rng, B, T, C), _normal(rng, B, T, C)

    def lin(a, w):  # a (N, in) @ w(out, in)^T
        return k.gemm(a, p[w], False, True)

    def lin_back(d, a, w):  # -> (d @ w, d^T @ a): input and weight gradients of lin
        return k.gemm(d, p[w]), k.gemm(d, a, True, False)

    theta, eps = cfg.rope_theta, cfg.norm_eps
    x_NC = x.reshape(N, C)
    a, r1 = k.rmsnorm_forward(x_NC, p["input_layernorm.weight"], eps)
    q = k.rope_forward(lin(a, "self_attn.q_proj.weight").reshape(B, T, NH, HS), theta)
    kk = k.rope_forward(lin(a, "self_attn.k_proj.weight").reshape(B, T, NKV, HS), theta)
    v = lin(a, "self_attn.v_proj.weight").reshape(B, T, NKV, HS)
    o, att = k.gqa_attention_forward(q, kk, v)
    o_NC = o.reshape(N, C)
    x2 = x_NC + lin(o_NC, "self_attn.o_proj.weight")
    a2, r2 = k.rmsnorm_forward(x2, p["post_attention_layernorm.weight"], eps)
    g, u = lin(a2, "mlp.gate_proj.weight"), lin(a2, "mlp.up_proj.weight")
    h = k.swiglu_forward(g, u)
    out = x2 + lin(h, "mlp.down_proj.weight")

    grads = {}
    d = dout.reshape(N, C)
    dh, grads["mlp.down_proj.weight"] = lin_back(d, h, "mlp.down_proj.weight")
    dg, du = k.swiglu_backward(dh, g, u)
    da_g, grads["mlp.gate_proj.weight"] = lin_back(dg, a2, "mlp.gate_proj.weight")
    da_u, grads["mlp.up_proj.weight"] = lin_back(du, a2, "mlp.up_proj.weight")
    dx2, grads["post_attention_layernorm.weight"] = k.rmsnorm_backward(
        da_g + da_u, x2, p["post_attention_layernorm.weight"], r2)
    dx2 = dx2 + d  # the residual
    do, grads["self_attn.o_proj.weight"] = lin_back(dx2, o_NC, "self_attn.o_proj.weight")
    dq, dk, dv = k.gqa_attention_backward(do.reshape(B, T, NH, HS), q, kk, v, att)
    dq = k.rope_backward(dq, theta).reshape(N, C)
    dk = k.rope_backward(dk, theta).reshape(N, NKV * HS)
    da = np.zeros_like(a)
    for name, dproj in (("q_proj", dq), ("k_proj", dk), ("v_proj", dv.reshape(N, NKV * HS))):
        da_p, grads[f"self_attn.{name}.weight"] = lin_back(dproj, a, f"self_attn.{name}.weight")
        da = da + da_p
    dx1, grads["input_layernorm.weight"] = k.rmsnorm_backward(da, x_NC,
                                                              p["input_layernorm.weight"], r1)
    dx = dx1 + dx2

    want, (g_p, g_x) = _vjp_block(p, x, dout, cfg)
    yield "llama-block.out", out.reshape(B, T, C), _np(want)
    yield "llama-block.dx", dx.reshape(B, T, C), _np(g_x)
    for name in llama.LAYER_KEYS:
        yield f"llama-block.grad/{name}", grads[name], _np(g_p[name])


def op_comparisons(model, B: int, T: int, seed: int, threads: int = 1
                   ) -> Iterator[Comparison]:
    """Every Llama op-tier comparison for one model shape and micro-batch shape, named
    "op/<kernel>[T=<T>].<what>" like harness/parity_ops.op_comparisons: the kernels, then the
    composed block."""
    for what, got, want in (*kernels(model, B, T, seed, threads),
                            *composed_block(model, B, T, seed, threads)):
        yield f"op/{what.replace('.', f'[T={T}].', 1)}", got, want


__all__ = ["kernels", "composed_block", "op_comparisons"]
