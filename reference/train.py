"""Training steps for the JAX reference: gradient accumulation over M micro-batches + AdamW.

`make_train_step` is the single-device control every pipelined run is compared with;
`run_trajectory` runs K steps for trajectory parity. No data loading, no timing, no logging.
"""

from __future__ import annotations

import jax
import numpy as np

from . import gpt2, llama
from .optim import AdamWState, adamw_init, adamw_update


def set_precision():
    """Make fp32 matmuls really fp32. On GPUs JAX computes fp32 matmuls in TF32 by default
    (~1e-3 relative error), which would swamp fp32 parity tolerances; on CPU it is a no-op in
    effect. Sets only the matmul precision: x64 stays off, parameters stay fp32."""
    jax.config.update("jax_default_matmul_precision", "highest")


def as_microbatches(x_BT, microbatches):
    """(B, T) -> (M, B/M, T); an array that is already (M, b, T) is checked and returned."""
    if x_BT.ndim == 3:
        if x_BT.shape[0] != microbatches:
            raise ValueError(f"leading dim {x_BT.shape[0]} != microbatches={microbatches}")
        return x_BT
    B, T = x_BT.shape
    if B % microbatches:
        raise ValueError(f"batch size {B} is not divisible by microbatches={microbatches}")
    return x_BT.reshape(microbatches, B // microbatches, T)


def make_train_step(cfg, opt_cfg, microbatches):
    """Jitted `(params, state, tokens, targets) -> (params, state, loss, grad_norm)` for the
    model `cfg` describes (a GPTConfig or a reference.llama.LlamaConfig).

    tokens/targets: (M, B/M, T) int32, or (B, T) split into M contiguous micro-batches.
    loss is the mean of the M micro-batch losses before the update; grad_norm is pre-clip.
    Matmul precision is the caller's choice (call `set_precision()` for parity).
    """
    family = llama if isinstance(cfg, llama.LlamaConfig) else gpt2  # the model cfg describes

    def step(params, state: AdamWState, tokens, targets):
        tokens_MBT = as_microbatches(tokens, microbatches)
        targets_MBT = as_microbatches(targets, microbatches)
        loss, grads = family.accumulated_loss_and_grads(params, tokens_MBT, targets_MBT, cfg)
        params, state, grad_norm = adamw_update(params, grads, state, opt_cfg)
        return params, state, loss, grad_norm

    return jax.jit(step)


def run_trajectory(params, batches, cfg, opt_cfg, microbatches):
    """Run one step per (tokens, targets) in `batches` from a fresh AdamW state, at "highest"
    matmul precision (this is a parity path). Returns (final params, losses (K,) numpy, in the
    parameters' dtype)."""
    set_precision()
    step = make_train_step(cfg, opt_cfg, microbatches)
    state = adamw_init(params)
    losses = []
    for tokens, targets in batches:
        params, state, loss, _ = step(params, state, tokens, targets)
        losses.append(loss)
    return params, np.asarray(jax.device_get(losses))
