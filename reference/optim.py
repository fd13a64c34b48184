"""AdamW exactly as docs/model.md writes it: global-norm clipping, bias correction, decoupled
weight decay on tensors of rank >= 2 only, all in fp32 and in the documented order.

Pure and jit-able; state is a pytree. Not a general optimizer library (no schedules, no masks).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # <= 0 disables clipping


class AdamWState(NamedTuple):
    step: jax.Array  # int32 scalar: number of updates done so far (t of the next update - 1)
    m: dict          # first moments, fp32, keyed like params
    v: dict          # second moments, fp32, keyed like params


def adamw_init(params) -> AdamWState:
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    return AdamWState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                      jax.tree.map(zeros, params))


def global_norm(grads):
    """sqrt of the sum of squares of every element of every tensor, in fp32. Tensors are summed
    in the dict's key order, which under jit is jax's sorted pytree order, not table order."""
    total = jnp.zeros((), jnp.float32)
    for g in grads.values():
        g = g.astype(jnp.float32)
        total = total + jnp.sum(g * g)
    return jnp.sqrt(total)


def adamw_update(params, grads, state: AdamWState, cfg: AdamWConfig):
    """One AdamW step -> (new params, new state, grad_norm), grad_norm taken before clipping.

    params and grads are dicts with the same keys; new params keep each parameter's dtype.
    """
    norm = global_norm(grads)
    clip = jnp.float32(1.0)
    if cfg.grad_clip > 0:
        clip = jnp.where(norm > cfg.grad_clip, cfg.grad_clip / norm, clip)
    t = (state.step + 1).astype(jnp.float32)
    bc1 = 1.0 - jnp.float32(cfg.beta1) ** t
    bc2 = 1.0 - jnp.float32(cfg.beta2) ** t
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k].astype(jnp.float32) * clip
        m = cfg.beta1 * state.m[k] + (1.0 - cfg.beta1) * g
        v = cfg.beta2 * state.v[k] + (1.0 - cfg.beta2) * (g * g)
        m_hat, v_hat = m / bc1, v / bc2
        decay = cfg.weight_decay if p.ndim >= 2 else 0.0
        p32 = p.astype(jnp.float32)
        p32 = p32 - cfg.lr * (m_hat / (jnp.sqrt(v_hat) + cfg.eps) + decay * p32)
        new_p[k] = p32.astype(p.dtype)
        new_m[k], new_v[k] = m, v
    return new_p, AdamWState(state.step + 1, new_m, new_v), norm
