"""Llama as pure single-device JAX functions over a flat dict of named parameters (docs/model.md,
"Llama family").

Parameters use the public Llama checkpoint names and layouts (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight` stored (out, in), ..., `lm_head.weight`), so a public
safetensors file loads as is. RMSNorm, rotary embeddings (half-split convention) on q and k,
grouped-query attention, SwiGLU MLP, no biases, untied output head. No pipeline or schedule
logic, no I/O.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from . import ops

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
LAYER_KEYS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
              "self_attn.v_proj.weight", "self_attn.o_proj.weight",
              "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "mlp.down_proj.weight")


def llama_ffn_dim(n_embd: int, multiple_of: int = 256) -> int:
    """Llama's MLP width rule: 2/3 of 4C (the SwiGLU MLP has three matrices, GPT-2's two, so
    this keeps the parameter count of a 4C MLP), rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * -(-hidden // multiple_of)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model shape. head_dim = n_embd / n_head; n_kv_head divides n_head; ffn_dim is the MLP
    width F (see llama_ffn_dim for the public rule). n_positions bounds T (RoPE has no table
    to outgrow; it is the engine's activation size)."""
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    vocab_size: int
    ffn_dim: int
    n_positions: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd = {self.n_embd} is not divisible by n_head = {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head = {self.n_kv_head} does not divide n_head = "
                             f"{self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim = {self.n_embd // self.n_head} must be even (RoPE)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> shape in table order (docs/model.md). Linear weights are (out, in)."""
    L, C, V, F = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim
    HS = C // cfg.n_head
    KV = cfg.n_kv_head * HS
    layer = dict(zip(LAYER_KEYS, [(C,), (C, C), (KV, C), (KV, C), (C, C), (C,), (F, C), (F, C),
                                  (C, F)]))
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(L):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    shapes.update({"model.norm.weight": (C,), "lm_head.weight": (V, C)})
    return shapes


def n_layers(params) -> int:
    """Layer count derived from the names `model.layers.{i}.*` in `params`."""
    ids = {int(m.group(1)) for k in params if (m := _LAYER_RE.match(k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"layer indices in params are not 0..L-1: {sorted(ids)}")
    return len(ids)


def layer_params(params, i) -> dict:
    """The 9 tensors of layer i keyed without their `model.layers.{i}.` prefix."""
    return {k: params[f"model.layers.{i}.{k}"] for k in LAYER_KEYS}


def embed(params, tokens_BT):
    """Token embedding only: positions enter through RoPE inside attention."""
    return params["model.embed_tokens.weight"][tokens_BT]


def attention(p, x_BTC, cfg):
    """q, k, v projections, RoPE on q and k, causal GQA, output projection -> (B, T, C)."""
    B, T, C = x_BTC.shape
    NH, NKV = cfg.n_head, cfg.n_kv_head
    HS = C // NH
    q_BTNH = ops.linear_out_in(x_BTC, p["self_attn.q_proj.weight"]).reshape(B, T, NH, HS)
    k_BTKH = ops.linear_out_in(x_BTC, p["self_attn.k_proj.weight"]).reshape(B, T, NKV, HS)
    v_BTKH = ops.linear_out_in(x_BTC, p["self_attn.v_proj.weight"]).reshape(B, T, NKV, HS)
    q_BTNH = ops.rope(q_BTNH, cfg.rope_theta)
    k_BTKH = ops.rope(k_BTKH, cfg.rope_theta)
    o_BTC = ops.gqa_attention(q_BTNH, k_BTKH, v_BTKH).reshape(B, T, C)
    return ops.linear_out_in(o_BTC, p["self_attn.o_proj.weight"])


def block(p, x_BTC, cfg):
    """One Llama block: RMSNorm -> GQA attention -> residual, RMSNorm -> SwiGLU -> residual."""
    a_BTC = ops.rmsnorm(x_BTC, p["input_layernorm.weight"], cfg.norm_eps)
    x_BTC = ops.residual(x_BTC, attention(p, a_BTC, cfg))
    a_BTC = ops.rmsnorm(x_BTC, p["post_attention_layernorm.weight"], cfg.norm_eps)
    h_BTF = ops.swiglu(ops.linear_out_in(a_BTC, p["mlp.gate_proj.weight"]),
                       ops.linear_out_in(a_BTC, p["mlp.up_proj.weight"]))
    return ops.residual(x_BTC, ops.linear_out_in(h_BTF, p["mlp.down_proj.weight"]))


def head(params, x_BTC, cfg):
    """Final RMSNorm and the untied output head -> logits (B, T, V)."""
    x_BTC = ops.rmsnorm(x_BTC, params["model.norm.weight"], cfg.norm_eps)
    return ops.linear_out_in(x_BTC, params["lm_head.weight"])


def forward(params, tokens_BT, cfg):
    """Logits (B, T, V) in the dtype of the parameters."""
    x_BTC = embed(params, tokens_BT)
    for i in range(n_layers(params)):
        x_BTC = block(layer_params(params, i), x_BTC, cfg)
    return head(params, x_BTC, cfg)


def loss_fn(params, tokens_BT, targets_BT, cfg):
    """Mean cross-entropy over all (b, t) -> scalar."""
    return ops.softmax_cross_entropy(forward(params, tokens_BT, cfg), targets_BT)


def loss_and_grads(params, tokens_BT, targets_BT, cfg):
    """(loss, grads) with grads a dict keyed like params."""
    return jax.value_and_grad(loss_fn)(params, tokens_BT, targets_BT, cfg)


def accumulated_loss_and_grads(params, tokens_MBT, targets_MBT, cfg):
    """Gradient accumulation over M equal micro-batches, in micro-batch order: each
    micro-batch's loss and gradients are scaled by 1/M and added to the running sums (as in
    reference.gpt2.accumulated_loss_and_grads)."""
    M = tokens_MBT.shape[0]
    if targets_MBT.shape != tokens_MBT.shape:
        raise ValueError(f"targets shape {targets_MBT.shape} != tokens shape {tokens_MBT.shape}")
    scale = 1.0 / M

    def step(acc, batch):
        loss, grads = loss_and_grads(params, batch[0], batch[1], cfg)
        acc_loss, acc_grads = acc
        acc_grads = jax.tree.map(lambda a, g: a + g * scale, acc_grads, grads)
        return (acc_loss + loss * scale, acc_grads), None

    dtype = params["model.embed_tokens.weight"].dtype
    zeros = (jnp.zeros((), dtype), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(step, zeros, (tokens_MBT, targets_MBT))
    return loss, grads


__all__ = ["LlamaConfig", "LAYER_KEYS", "llama_ffn_dim", "param_shapes", "n_layers",
           "layer_params", "embed", "attention", "block", "head", "forward", "loss_fn",
           "loss_and_grads", "accumulated_loss_and_grads"]
