"""The ops of docs/model.md (GPT-2 and Llama families) as pure JAX functions, one each.

These are the maths the engine kernels are held to (op-level parity through `jax.vjp`) and the
only building blocks of reference/gpt2.py and reference/llama.py. Not fast, not fused, no
parameter names: arrays in, arrays out, computed in the dtype of the inputs. Rank-promotion safe
(broadcasts are explicit).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN_EPS = 1e-5


def _lead(v, x):
    """View the 1-D vector `v` as (1, ..., 1, N) so it broadcasts against `x` without promotion."""
    return v.reshape((1,) * (x.ndim - 1) + v.shape)


def encoder(wte_VC, wpe_PC, tokens_BT):
    """Token plus position embedding: wte[tokens] + wpe[0:T] -> (B, T, C).

    Token ids must lie in [0, V): like any JAX gather, out-of-range ids are clamped, not caught.
    """
    T = tokens_BT.shape[1]
    if T > wpe_PC.shape[0]:
        raise ValueError(f"sequence length T={T} exceeds n_positions={wpe_PC.shape[0]}")
    return wte_VC[tokens_BT] + wpe_PC[None, :T, :]


def layernorm(x_BTC, w_C, b_C):
    """(x - mean) / sqrt(var + 1e-5) * w + b over the last axis; var is biased (divide by C)."""
    mean_BT1 = jnp.mean(x_BTC, axis=-1, keepdims=True)
    xc_BTC = x_BTC - mean_BT1
    var_BT1 = jnp.mean(xc_BTC * xc_BTC, axis=-1, keepdims=True)
    return xc_BTC / jnp.sqrt(var_BT1 + LN_EPS) * _lead(w_C, x_BTC) + _lead(b_C, x_BTC)


def matmul(x_BTK, W_KN, bias_N=None):
    """x @ W (+ bias): weights are stored (in, out) as in the GPT-2 checkpoint. Any leading dims."""
    y_BTN = jnp.einsum("...k,kn->...n", x_BTK, W_KN)
    return y_BTN if bias_N is None else y_BTN + _lead(bias_N, y_BTN)


# None: the explicit attention below (the spec, used by parity). "cudnn" or "xla": the same
# maths through jax.nn.dot_product_attention, the fast path a framework user would run; benchmarks
# on GPUs pick "cudnn" so that the engine is compared with JAX at its best (FACTS.md anchors).
_ATTENTION_IMPL: str | None = None


def set_attention_implementation(impl: str | None) -> None:
    """Select how `attention` computes (None, "xla" or "cudnn"); takes effect at the next trace."""
    global _ATTENTION_IMPL
    if impl not in (None, "xla", "cudnn"):
        raise ValueError(f"attention implementation {impl!r}: use None, 'xla' or 'cudnn'")
    _ATTENTION_IMPL = impl


def attention(qkv_BT3C, n_head):
    """Causal multi-head attention on packed qkv (q = [0:C], k = [C:2C], v = [2C:3C]) -> (B, T, C).

    Head n uses columns n*HS:(n+1)*HS of each of q, k, v; scores are divided by sqrt(HS) and
    masked to -inf above the diagonal before the softmax.
    """
    B, T, C3 = qkv_BT3C.shape
    C = C3 // 3
    if C3 != 3 * C or C % n_head:
        raise ValueError(f"attention: qkv last dim {C3} must be 3*C with C divisible by "
                         f"n_head={n_head}")
    HS = C // n_head
    q_BTNH, k_BTNH, v_BTNH = (t.reshape(B, T, n_head, HS)
                              for t in jnp.split(qkv_BT3C, 3, axis=-1))
    if _ATTENTION_IMPL is not None:
        o_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True,
                                              implementation=_ATTENTION_IMPL)
        return o_BTNH.reshape(B, T, C)
    s_BNTT = jnp.einsum("btnh,bunh->bntu", q_BTNH, k_BTNH) / math.sqrt(HS)
    causal_11TT = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]
    s_BNTT = jnp.where(causal_11TT, s_BNTT, -jnp.inf)
    p_BNTT = jax.nn.softmax(s_BNTT, axis=-1)
    o_BTNH = jnp.einsum("bntu,bunh->btnh", p_BNTT, v_BTNH)
    return o_BTNH.reshape(B, T, C)


def gelu(x):
    """tanh GELU: 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def residual(a, b):
    """The residual add, a + b (an op of its own because the engine fuses it)."""
    return a + b


def lm_head(x_BTC, wte_VC):
    """Tied LM head: logits = x @ wte^T -> (B, T, V)."""
    return jnp.einsum("btc,vc->btv", x_BTC, wte_VC)


def softmax_cross_entropy(logits_BTV, targets_BT):
    """Mean over (b, t) of -log softmax(logits[b, t])[targets[b, t]] -> scalar."""
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.mean(nll_BT)


# ---- Llama family (docs/model.md, "Llama family") ------------------------------------------------


def rmsnorm(x_BTC, w_C, eps):
    """x / sqrt(mean(x²) + eps) * w over the last axis (no mean subtracted, no bias)."""
    ms_BT1 = jnp.mean(x_BTC * x_BTC, axis=-1, keepdims=True)
    return x_BTC / jnp.sqrt(ms_BT1 + eps) * _lead(w_C, x_BTC)


def rope_tables(T, head_dim, theta):
    """cos and sin of the rotary angles, each (T, head_dim/2) float64 numpy arrays.

    angle[t, i] = t · theta^(-2i / head_dim) for positions t = 0..T-1 and pairs i < head_dim/2.
    Computed in float64 from static sizes and rounded once by the caller, so the table does not
    depend on the precision of the activations (an fp32 t · inv_freq loses up to 1e-4 rad
    at t ~ 1000)."""
    import numpy as np

    if head_dim % 2:
        raise ValueError(f"rope: head_dim = {head_dim} must be even (pairs of channels rotate)")
    inv_freq = float(theta) ** (-2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim)
    angle_TH = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle_TH), np.sin(angle_TH)


def rope(x_BTNH, theta):
    """Rotary position embedding, half-split ("rotate_half") convention of the public Llama code.

    x (B, T, heads, head_dim) at positions 0..T-1. Channel i < head_dim/2 pairs with channel
    i + head_dim/2 (not with its neighbour 2i+1, the interleaved convention of the original
    paper and Meta's code); each pair (x1, x2) turns by angle[t, i]:
        out[..., i]          = x1·cos - x2·sin
        out[..., i + half]   = x2·cos + x1·sin
    which is x·[cos, cos] + rotate_half(x)·[sin, sin] with rotate_half(x) = [-x2, x1]."""
    B, T, N, H = x_BTNH.shape
    half = H // 2
    cos_TH, sin_TH = rope_tables(T, H, theta)
    cos_1T1H = jnp.asarray(cos_TH, x_BTNH.dtype)[None, :, None, :]
    sin_1T1H = jnp.asarray(sin_TH, x_BTNH.dtype)[None, :, None, :]
    x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
    return jnp.concatenate([x1 * cos_1T1H - x2 * sin_1T1H, x2 * cos_1T1H + x1 * sin_1T1H],
                           axis=-1)


def swiglu(gate, up):
    """SwiGLU's gating: silu(gate) · up, with silu(g) = g · sigmoid(g); element-wise."""
    return gate * jax.nn.sigmoid(gate) * up


def gqa_attention(q_BTNH, k_BTKH, v_BTKH):
    """Causal grouped-query attention -> (B, T, NH, HS).

    q has NH heads, k and v have NKV heads (NKV divides NH); query head n reads key/value head
    n // (NH / NKV), so each group of NH/NKV consecutive query heads shares one key/value head
    (NKV = NH is multi-head attention, NKV = 1 multi-query). Scores are divided by sqrt(HS) and
    masked to -inf above the diagonal before the softmax."""
    B, T, NH, HS = q_BTNH.shape
    NKV = k_BTKH.shape[2]
    if k_BTKH.shape != (B, T, NKV, HS) or v_BTKH.shape != k_BTKH.shape:
        raise ValueError(f"gqa_attention: q {q_BTNH.shape}, k {k_BTKH.shape}, v {v_BTKH.shape}:"
                         " k and v must be (B, T, n_kv_head, head_dim) like q's (B, T, ., .)")
    if NH % NKV:
        raise ValueError(f"gqa_attention: n_kv_head = {NKV} does not divide n_head = {NH}")
    if _ATTENTION_IMPL is not None:  # grouped heads natively (the same n // group mapping)
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True,
                                            implementation=_ATTENTION_IMPL)
    group = NH // NKV
    k_BTNH = jnp.repeat(k_BTKH, group, axis=2)  # head n <- kv head n // group
    v_BTNH = jnp.repeat(v_BTKH, group, axis=2)
    s_BNTT = jnp.einsum("btnh,bunh->bntu", q_BTNH, k_BTNH) / math.sqrt(HS)
    causal_11TT = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]
    s_BNTT = jnp.where(causal_11TT, s_BNTT, -jnp.inf)
    p_BNTT = jax.nn.softmax(s_BNTT, axis=-1)
    return jnp.einsum("bntu,bunh->btnh", p_BNTT, v_BTNH)


def linear_out_in(x_BTK, W_NK):
    """x @ Wᵀ for a weight stored (out, in), the nn.Linear layout of the public Llama files."""
    return jnp.einsum("...k,nk->...n", x_BTK, W_NK)
