"""GPT-2 as pure single-device JAX functions over a flat dict of named parameters (docs/model.md).

Parameters use the public GPT-2 names (`wte.weight`, `h.{i}.attn.c_attn.weight`, ...) that the
engine's parameter table exports; this file never invents names (`param_shapes` exists to check
that table). It holds no pipeline or schedule logic: a schedule must not change these maths.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from . import ops

_LAYER_RE = re.compile(r"^h\.(\d+)\.")
LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
              "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
              "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model shape. Functions below accept any object with these attributes."""
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> shape in the table order of docs/model.md (to check the engine's table against)."""
    L, C, V, P = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_positions
    layer = dict(zip(LAYER_KEYS, [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,),
                                  (C, 4 * C), (4 * C,), (4 * C, C), (C,)]))
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C)}
    for i in range(L):
        shapes.update({f"h.{i}.{k}": s for k, s in layer.items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def n_layers(params) -> int:
    """Layer count derived from the names `h.{i}.*` in `params` (so stage subsets work too)."""
    ids = {int(m.group(1)) for k in params if (m := _LAYER_RE.match(k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"layer indices in params are not 0..L-1: {sorted(ids)}")
    return len(ids)


def layer_params(params, i) -> dict:
    """The 12 tensors of layer i keyed without their `h.{i}.` prefix (e.g. 'ln_1.weight')."""
    return {k: params[f"h.{i}.{k}"] for k in LAYER_KEYS}


def embed(params, tokens_BT):
    return ops.encoder(params["wte.weight"], params["wpe.weight"], tokens_BT)


def block(p, x_BTC, n_head):
    """One pre-LN transformer block; `p` is a `layer_params` dict."""
    a_BTC = ops.layernorm(x_BTC, p["ln_1.weight"], p["ln_1.bias"])
    qkv_BT3C = ops.matmul(a_BTC, p["attn.c_attn.weight"], p["attn.c_attn.bias"])
    o_BTC = ops.attention(qkv_BT3C, n_head)
    y_BTC = ops.matmul(o_BTC, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    x_BTC = ops.residual(x_BTC, y_BTC)
    a_BTC = ops.layernorm(x_BTC, p["ln_2.weight"], p["ln_2.bias"])
    m_BTF = ops.gelu(ops.matmul(a_BTC, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]))
    return ops.residual(x_BTC, ops.matmul(m_BTF, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"]))


def head(params, x_BTC):
    """Final LayerNorm and the tied LM head -> logits (B, T, V)."""
    x_BTC = ops.layernorm(x_BTC, params["ln_f.weight"], params["ln_f.bias"])
    return ops.lm_head(x_BTC, params["wte.weight"])


def forward(params, tokens_BT, cfg):
    """Logits (B, T, V) in the dtype of the parameters. `cfg` supplies n_head only."""
    x_BTC = embed(params, tokens_BT)
    for i in range(n_layers(params)):
        x_BTC = block(layer_params(params, i), x_BTC, cfg.n_head)
    return head(params, x_BTC)


def loss_fn(params, tokens_BT, targets_BT, cfg):
    """Mean cross-entropy over all (b, t) -> scalar."""
    return ops.softmax_cross_entropy(forward(params, tokens_BT, cfg), targets_BT)


def loss_and_grads(params, tokens_BT, targets_BT, cfg):
    """(loss, grads) with grads a dict keyed like params; wte's two uses are summed by autodiff."""
    return jax.value_and_grad(loss_fn)(params, tokens_BT, targets_BT, cfg)


def accumulated_loss_and_grads(params, tokens_MBT, targets_MBT, cfg):
    """Gradient accumulation over M equal micro-batches, in micro-batch order.

    loss = Σ_m loss_m · (1/M) and grads = Σ_m grads_m · (1/M): each micro-batch's contribution is
    scaled by 1/M and then added to the running sum, as the engine does.
    """
    M = tokens_MBT.shape[0]
    if targets_MBT.shape != tokens_MBT.shape:
        raise ValueError(f"targets shape {targets_MBT.shape} != tokens shape {tokens_MBT.shape}")
    scale = 1.0 / M

    def step(acc, batch):
        loss, grads = loss_and_grads(params, batch[0], batch[1], cfg)
        acc_loss, acc_grads = acc
        acc_grads = jax.tree.map(lambda a, g: a + g * scale, acc_grads, grads)
        return (acc_loss + loss * scale, acc_grads), None

    dtype = params["wte.weight"].dtype
    zeros = (jnp.zeros((), dtype), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(step, zeros, (tokens_MBT, targets_MBT))
    return loss, grads
