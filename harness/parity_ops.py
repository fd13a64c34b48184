"""The op tier of `tandem parity`: every engine kernel, forward and backward, against the
reference ops (reference/ops.py) and their jax.vjp, on seeded random inputs. Yields
(name, engine array, reference array) triples; tolerances and output are harness/parity.py's.

Two levels, both at the case's micro-batch shape and at T = 1:
  kernels  each td_op_* entry point (harness.engine.Ops) on its own: GEMM (all four transposes),
           encoder, LayerNorm, matmul (linear), attention, GELU, softmax cross-entropy
  stages   the smallest units a pipeline stage isolates through the model ABI: a first stage
           with no layers (encoder), a middle stage with one layer (block: LayerNorm, linear,
           attention, GELU and the residual adds composed), a last stage with no layers (head:
           final LayerNorm, tied LM head, loss); these also check the stage-pass plumbing.
Backward kernels that need forward state (LayerNorm's mean/rstd, attention's probabilities,
softmax's probabilities) get the engine's own forward outputs.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from harness.engine import Model, Ops
from reference import gpt2, ops

# (name, got, want): got from the engine, want from JAX, both fp32 numpy arrays
Comparison = tuple[str, np.ndarray, np.ndarray]


def _stage_config(model, B: int, T: int, threads: int, *, stages: int, stage: int,
                  layers: tuple[int, int]) -> dict:
    return dict(n_layer=1, n_embd=model.n_embd, n_head=model.n_head,
                vocab_size=model.vocab_size, n_positions=max(model.n_positions, T), seq_len=T,
                batch_size=B, threads=threads, stages=stages, stage=stage,
                layer_begin=layers[0], layer_end=layers[1])


def _random_params(table, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights large enough to exercise every term (attention far from uniform, GELU curved,
    LayerNorm weights and biases away from 1 and 0): linear weights and embeddings N(0, 0.2^2),
    LayerNorm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    out = {}
    for p in table:
        last = p.name.rsplit(".", 2)
        if len(p.shape) >= 2:
            w = rng.normal(0.0, 0.2, p.shape)
        elif "ln_" in p.name and last[-1] == "weight":
            w = 1.0 + rng.normal(0.0, 0.1, p.shape)
        else:
            w = rng.normal(0.0, 0.1, p.shape)
        out[p.name] = w.astype(np.float32)
    return out


def _normal(rng, *shape) -> np.ndarray:
    return rng.normal(0.0, 1.0, shape).astype(np.float32)


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float32)


# ---- kernels, one by one (td_op_*) -------------------------------------------------------------


@jax.jit
def _vjp_encoder(wte, wpe, tokens, dout):
    out, vjp = jax.vjp(lambda a, b: ops.encoder(a, b, tokens), wte, wpe)
    return out, vjp(dout)


@jax.jit
def _vjp_layernorm(x, w, b, dout):
    out, vjp = jax.vjp(ops.layernorm, x, w, b)
    return out, vjp(dout)


@jax.jit
def _vjp_matmul(x, w, bias, dout):
    out, vjp = jax.vjp(ops.matmul, x, w, bias)
    return out, vjp(dout)


@functools.partial(jax.jit, static_argnums=2)
def _vjp_attention(qkv, dout, n_head):
    out, vjp = jax.vjp(lambda q: ops.attention(q, n_head), qkv)
    return out, vjp(dout)[0]


@jax.jit
def _vjp_gelu(x, dout):
    out, vjp = jax.vjp(ops.gelu, x)
    return out, vjp(dout)[0]


@jax.jit
def _vjp_cross_entropy(logits_NV, targets_N):
    """Per-row losses, and the gradient of their mean (what the model's loss is)."""
    rows = jax.vmap(lambda z, y: ops.softmax_cross_entropy(z[None, None], y[None, None]))
    losses = rows(logits_NV, targets_N)
    mean, vjp = jax.vjp(lambda z: ops.softmax_cross_entropy(z[None], targets_N[None]), logits_NV)
    return losses, vjp(jnp.ones((), mean.dtype))[0]


def kernels(model, B: int, T: int, seed: int, threads: int = 1) -> Iterator[Comparison]:
    """Every td_op_* kernel at micro-batch (B, T) of `model`'s shape (threads: unused, the op
    entry points run with the library's current OpenMP setting)."""
    rng = np.random.default_rng([seed, 4, T])
    C, NH, V = model.n_embd, model.n_head, model.vocab_size
    N = B * T
    k = Ops()

    # GEMM: the LM head's shape (N, V, C) in every transpose layout the model uses and more
    A, Bm = _normal(rng, N, C), _normal(rng, C, V)
    for ta in (False, True):
        for tb in (False, True):
            a = np.ascontiguousarray(A.T) if ta else A
            b = np.ascontiguousarray(Bm.T) if tb else Bm
            yield f"gemm{'T' if ta else 'N'}{'T' if tb else 'N'}.out", k.gemm(a, b, ta, tb), \
                _np(jnp.asarray(A) @ jnp.asarray(Bm))

    wte, wpe = 0.2 * _normal(rng, V, C), 0.2 * _normal(rng, T, C)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    dout = _normal(rng, B, T, C)
    want, (g_wte, g_wpe) = _vjp_encoder(wte, wpe, tokens, dout)
    dwte, dwpe = k.encoder_backward(dout, tokens, V, T)
    yield "encoder.out", k.encoder_forward(tokens, wte, wpe), _np(want)
    yield "encoder.dwte", dwte, _np(g_wte)
    yield "encoder.dwpe", dwpe, _np(g_wpe)

    x = 2.0 * _normal(rng, B, T, C) + 0.5
    w, b = 1.0 + 0.1 * _normal(rng, C), 0.1 * _normal(rng, C)
    out, mean, rstd = k.layernorm_forward(x, w, b)
    dx, dw, db = k.layernorm_backward(dout, x, w, mean, rstd)
    want, (g_x, g_w, g_b) = _vjp_layernorm(x, w, b, dout)
    yield "layernorm.out", out, _np(want)
    yield "layernorm.dx", dx, _np(g_x)
    yield "layernorm.dw", dw, _np(g_w)
    yield "layernorm.db", db, _np(g_b)

    for name, IC, OC in (("matmul[qkv]", C, 3 * C), ("matmul[fc]", C, 4 * C),
                         ("matmul[proj]", 4 * C, C)):
        x, w, bias = _normal(rng, B, T, IC), 0.2 * _normal(rng, IC, OC), 0.1 * _normal(rng, OC)
        dout = _normal(rng, B, T, OC)
        dx, dw, db = k.matmul_backward(dout, x, w)
        want, (g_x, g_w, g_b) = _vjp_matmul(x, w, bias, dout)
        yield f"{name}.out", k.matmul_forward(x, w, bias), _np(want)
        yield f"{name}.dx", dx, _np(g_x)
        yield f"{name}.dw", dw, _np(g_w)
        yield f"{name}.db", db, _np(g_b)

    qkv, dout = _normal(rng, B, T, 3 * C), _normal(rng, B, T, C)
    out, att = k.attention_forward(qkv, NH)
    want, g_qkv = _vjp_attention(qkv, dout, NH)
    yield "attention.out", out, _np(want)
    yield "attention.dqkv", k.attention_backward(dout, qkv, att, NH), _np(g_qkv)

    x, dout = 2.0 * _normal(rng, B, T, 4 * C), _normal(rng, B, T, 4 * C)
    want, g_x = _vjp_gelu(x, dout)
    yield "gelu.out", k.gelu_forward(x), _np(want)
    yield "gelu.dx", k.gelu_backward(x, dout), _np(g_x)
    # GELU's negative tail, where it curves and its output is small: on N(0, 2^2) inputs the
    # relative L2 is carried by large x, where GELU(x) ~ x whatever its constants, so a cubic
    # coefficient off by 1e-4 relative moves it by ~1e-6 (below the gate); on [-3, -1] by
    # ~2.8e-5 (measured). Not further out: the fp32 reference's 1 + tanh(u) cancels there
    # (2e-6 of error at [-3.5, -1.5], 1e-5 at [-5, -2], against 7e-7 here).
    tail = np.random.default_rng([seed, 5, T])
    x = tail.uniform(-3.0, -1.0, (B, T, 4 * C)).astype(np.float32)
    dout = _normal(tail, B, T, 4 * C)
    want, g_x = _vjp_gelu(x, dout)
    yield "gelu_tail.out", k.gelu_forward(x), _np(want)
    yield "gelu_tail.dx", k.gelu_backward(x, dout), _np(g_x)

    logits, targets = 2.0 * _normal(rng, N, V), rng.integers(0, V, N).astype(np.int32)
    # both ends of the vocabulary are always targets: id 0 and V - 1 are where an off-by-one
    # in the one-hot hides, and random ids reach them only by luck
    targets[0], targets[-1] = 0, V - 1
    probs, losses = k.softmax_crossentropy_forward(logits, targets)
    want_losses, g_logits = _vjp_cross_entropy(logits, targets)
    yield "softmax_crossentropy.losses", losses, _np(want_losses)
    dlogits = k.softmax_crossentropy_backward(probs, targets, 1.0 / N)  # d(mean)/d(row) = 1/N
    yield "softmax_crossentropy.dlogits", dlogits, _np(g_logits)


# ---- stages: the units a pipeline stage isolates through the model ABI -----------------------


@functools.partial(jax.jit, static_argnums=3)
def _block_vjp(params, x, dout, n_head):
    out, vjp = jax.vjp(lambda p, x_: gpt2.block(p, x_, n_head), params, x)
    return out, vjp(dout)


@jax.jit
def _head_vjp(params, x, targets):
    out, vjp = jax.vjp(lambda p, x_: ops.softmax_cross_entropy(gpt2.head(p, x_), targets),
                       params, x)
    return out, vjp(jnp.ones((), out.dtype))


def encoder(model, B: int, T: int, seed: int, threads: int = 1) -> Iterator[Comparison]:
    rng = np.random.default_rng([seed, 1, T])
    cfg = _stage_config(model, B, T, threads, stages=2, stage=0, layers=(0, 0))
    with Model(**cfg) as m:
        params = _random_params(m.table, rng)
        tokens = rng.integers(0, model.vocab_size, (B, T)).astype(np.int32)
        dout = _normal(rng, B, T, model.n_embd)
        m.set_params(params)
        m.zero_grad()
        out, _ = m.stage_forward(0, tokens=tokens)
        m.stage_backward(0, dout=dout)
        grads = m.grads()

    want, (g_wte, g_wpe) = _vjp_encoder(params["wte.weight"], params["wpe.weight"], tokens, dout)
    yield "out", out, _np(want)
    yield "grad/wte.weight", grads["wte.weight"], _np(g_wte)
    yield "grad/wpe.weight", grads["wpe.weight"], _np(g_wpe)


def block(model, B: int, T: int, seed: int, threads: int = 1) -> Iterator[Comparison]:
    rng = np.random.default_rng([seed, 2, T])
    cfg = _stage_config(model, B, T, threads, stages=3, stage=1, layers=(0, 1))
    with Model(**cfg) as m:
        params = _random_params(m.table, rng)
        x = _normal(rng, B, T, model.n_embd)
        dout = _normal(rng, B, T, model.n_embd)
        m.set_params(params)
        m.zero_grad()
        out, _ = m.stage_forward(0, inputs=x)
        dx = m.stage_backward(0, dout=dout)
        grads = m.grads()

    local = {k.removeprefix("h.0."): v for k, v in params.items()}
    want, (g_params, g_x) = _block_vjp(local, x, dout, model.n_head)
    yield "out", out, _np(want)
    yield "dx", dx, _np(g_x)
    for name in params:
        yield f"grad/{name.removeprefix('h.0.')}", grads[name], _np(g_params[name[4:]])


def head(model, B: int, T: int, seed: int, threads: int = 1) -> Iterator[Comparison]:
    rng = np.random.default_rng([seed, 3, T])
    cfg = _stage_config(model, B, T, threads, stages=2, stage=1, layers=(1, 1))
    with Model(**cfg) as m:
        params = _random_params(m.table, rng)
        x = _normal(rng, B, T, model.n_embd)
        targets = rng.integers(0, model.vocab_size, (B, T)).astype(np.int32)
        m.set_params(params)
        m.zero_grad()
        _, loss = m.stage_forward(0, inputs=x, targets=targets)
        dx = m.stage_backward(0, grad_scale=1.0, shape=(B, T))
        grads = m.grads()

    want, (g_params, g_x) = _head_vjp(params, x, targets)
    yield "loss", np.float32(loss), _np(want)
    yield "dx", dx, _np(g_x)
    for name in params:
        yield f"grad/{name}", grads[name], _np(g_params[name])


UNITS = {"stage-encoder": encoder, "stage-block": block, "stage-head": head}


def op_comparisons(model, B: int, T: int, seed: int, threads: int = 1
                   ) -> Iterator[Comparison]:
    """Every op-tier comparison for one model shape (a harness.config.ModelConfig) and one
    micro-batch shape: "op/<kernel>[T=<T>].<what>" for the kernels, then
    "op/stage-<unit>[T=<T>].<what>" for the stage units."""
    for what, got, want in kernels(model, B, T, seed, threads):
        yield f"op/{what.replace('.', f'[T={T}].', 1)}", got, want
    for unit, fn in UNITS.items():
        for what, got, want in fn(model, B, T, seed, threads):
            yield f"op/{unit}[T={T}].{what}", got, want


__all__ = ["UNITS", "op_comparisons", "kernels", "encoder", "block", "head"]
