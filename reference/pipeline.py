"""A JAX GPipe baseline for benchmarks: L layers cut into P contiguous stages on P devices with
`shard_map` + `ppermute`, M micro-batches shifted stage to stage (MaxText-style shifting buffer),
embeddings on stage 0, final norm / LM head / loss on the last stage, backward by `jax.grad` of
the whole pipelined loss, then the same AdamW step as the single-device control.
Both model families: GPT-2 (a GPTConfig) and Llama (a LlamaConfig).
It is a framework baseline, not the spec: its loss and gradients must equal reference.gpt2's
(reference.llama's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from . import gpt2, llama, ops
from .optim import AdamWState, adamw_update
from .train import as_microbatches

try:  # jax >= 0.6 has jax.shard_map (keyword mesh/in_specs/out_specs)
    _shard_map = jax.shard_map
except AttributeError:  # older jax
    from jax.experimental.shard_map import shard_map as _shard_map

AXIS = "stage"
SHARED_KEYS = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")  # GPT-2's
LLAMA_SHARED_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _family(cfg):
    """What the pipeline needs of cfg's model family: (module, layer-name prefix, the tensors
    outside the layers, block(p, x), head(shared, x))."""
    if isinstance(cfg, llama.LlamaConfig):
        return (llama, "model.layers", LLAMA_SHARED_KEYS, lambda p, x: llama.block(p, x, cfg),
                lambda sh, x: llama.head(sh, x, cfg))
    return (gpt2, "h", SHARED_KEYS, lambda p, x: gpt2.block(p, x, cfg.n_head),
            lambda sh, x: gpt2.head(sh, x))


def _make_mesh(stages, devices):
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < stages:
        raise ValueError(f"GPipe with {stages} stages needs {stages} devices, found "
                         f"{len(devices)}. HINT: on CPU set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={stages} before jax starts")
    # jax.make_mesh defaults to explicit axes in new versions; shard_map wants Auto here.
    axis_type = getattr(jax.sharding, "AxisType", None)
    try:
        return jax.sharding.Mesh(np.asarray(devices[:stages]), (AXIS,),
                                 axis_types=(axis_type.Auto,))
    except (AttributeError, TypeError):  # jax without axis types
        return jax.sharding.Mesh(np.asarray(devices[:stages]), (AXIS,))


def _varying(x):
    """Mark a fresh (device-invariant) value as varying over the stage axis, where jax tracks it."""
    if hasattr(lax, "pcast"):
        return lax.pcast(x, AXIS, to="varying")
    if hasattr(lax, "pvary"):
        return lax.pvary(x, AXIS)
    return x


def make_gpipe_loss_and_grads(cfg, stages, microbatches, devices=None):
    """Jitted `(params, tokens, targets) -> (loss, grads)`, grads keyed like params.

    tokens/targets: (M, B/M, T) or (B, T). Layer tensors are restacked to (P, L/P, ...) and
    sharded over the stage axis; the tensors outside the layers (GPT-2: wte, wpe, ln_f; Llama:
    the embedding, the final norm, the untied head) are replicated, and the transpose of that
    replication sums GPT-2's tied wte gradients of embedding (stage 0) and LM head (last stage).
    SPMD costs: every stage computes on every one of the M+P-1 ticks (its bubble ticks on junk),
    and the head/loss runs on every stage, masked to the last: no longer in wall time than the
    last stage alone, but not free in energy or memory.
    """
    P, M = stages, microbatches
    if cfg.n_layer % P:
        raise ValueError(f"n_layer={cfg.n_layer} is not divisible by stages={P}")
    mesh = _make_mesh(P, devices)
    shift = [(s, (s + 1) % P) for s in range(P)]
    fam, prefix, shared_keys, block, head = _family(cfg)

    def stage_loss(stacked, shared, tokens_MBT, targets_MBT):
        # Runs on one device; stacked[k] is this stage's (1, L/P, ...) slice.
        stage = lax.axis_index(AXIS)
        local = {k: v[0] for k, v in stacked.items()}
        _, b, T = tokens_MBT.shape
        emb_MBTC = fam.embed(shared, tokens_MBT.reshape(M * b, T)).reshape(M, b, T, -1)

        def run_stage(x_BTC):
            return lax.scan(lambda x, p: (block(p, x), None), x_BTC, local)[0]

        def tick(carry, i):
            # Tick i: stage s works on micro-batch i - s; the last stage's result is micro-batch
            # i - (P-1) (earlier ticks write junk to slot 0 that tick P-1 overwrites).
            recv_BTC, outs_MBTC = carry
            x_BTC = jnp.where(stage == 0, emb_MBTC[jnp.minimum(i, M - 1)], recv_BTC)
            y_BTC = run_stage(x_BTC)
            outs_MBTC = lax.dynamic_update_index_in_dim(
                outs_MBTC, y_BTC, jnp.clip(i - (P - 1), 0, M - 1), 0)
            return (lax.ppermute(y_BTC, AXIS, shift), outs_MBTC), None

        init = (_varying(jnp.zeros_like(emb_MBTC[0])), _varying(jnp.zeros_like(emb_MBTC)))
        (_, outs_MBTC), _ = lax.scan(tick, init, jnp.arange(M + P - 1))
        losses_M = jax.vmap(lambda x_BTC, y_BT: ops.softmax_cross_entropy(
            head(shared, x_BTC), y_BT))(outs_MBTC, targets_MBT)
        loss = jnp.sum(losses_M * (1.0 / M))  # mean of the M micro-batch losses
        return lax.psum(jnp.where(stage == P - 1, loss, 0.0), AXIS)

    pipelined = _shard_map(stage_loss, mesh=mesh,
                           in_specs=(PartitionSpec(AXIS), PartitionSpec(), PartitionSpec(),
                                     PartitionSpec()),
                           out_specs=PartitionSpec())

    def loss_and_grads(params, tokens, targets):
        tokens_MBT = as_microbatches(tokens, M)
        targets_MBT = as_microbatches(targets, M)
        L = fam.n_layers(params)
        if L % P:
            raise ValueError(f"{L} layers in params are not divisible by stages={P}")
        stacked = {k: jnp.stack([params[f"{prefix}.{i}.{k}"] for i in range(L)]).reshape(
            (P, L // P) + params[f"{prefix}.0.{k}"].shape) for k in fam.LAYER_KEYS}
        shared = {k: params[k] for k in shared_keys}
        loss, (g_stacked, g_shared) = jax.value_and_grad(pipelined, argnums=(0, 1))(
            stacked, shared, tokens_MBT, targets_MBT)
        flat = dict(g_shared)
        for k, g in g_stacked.items():
            g = g.reshape((L,) + g.shape[2:])
            flat.update({f"{prefix}.{i}.{k}": g[i] for i in range(L)})
        return loss, {k: flat[k] for k in params}

    return jax.jit(loss_and_grads)


def make_gpipe_train_step(cfg, opt_cfg, stages, microbatches, devices=None):
    """Jitted `(params, state, tokens, targets) -> (params, state, loss, grad_norm)`, the same
    contract as reference.train.make_train_step. Parameters and optimizer state stay a flat,
    replicated dict (the update is repeated on each device: a baseline, not a memory design)."""
    loss_and_grads = make_gpipe_loss_and_grads(cfg, stages, microbatches, devices)

    def step(params, state: AdamWState, tokens, targets):
        loss, grads = loss_and_grads(params, tokens, targets)
        params, state, grad_norm = adamw_update(params, grads, state, opt_cfg)
        return params, state, loss, grad_norm

    return jax.jit(step)
