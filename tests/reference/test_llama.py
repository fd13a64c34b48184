"""Tests for reference/llama.py and the Llama ops of reference/ops.py: the parameter table in the
public names and (out, in) layouts, the whole model against plain numpy float64 written from
docs/model.md, the RoPE convention (identity at position 0, half-split pairs, scores that depend
only on the distance), GQA reducing to multi-head attention, a public-layout safetensors round
trip (F32 and BF16) through harness/init.py's reader and writer, jit vs eager, and gradient
accumulation vs the full batch. Rank promotion raises throughout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.init import read_safetensors, write_safetensors
from reference import llama, ops

CFG = llama.LlamaConfig(n_layer=2, n_embd=48, n_head=6, n_kv_head=2, vocab_size=37, ffn_dim=80,
                        n_positions=16, rope_theta=500.0, norm_eps=1e-5)


@pytest.fixture(autouse=True)
def _strict_jax():
    with jax.numpy_rank_promotion("raise"), jax.default_matmul_precision("highest"):
        yield


def init_params(cfg, seed=0, std=0.1):
    """Seeded test weights: matrices N(0, std^2), norm weights 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(1.0 + rng.normal(0.0, 0.1, s) if len(s) == 1
                              else rng.normal(0.0, std, s), jnp.float32)
            for name, s in llama.param_shapes(cfg).items()}


def tokens(cfg, shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---- the parameter table ------------------------------------------------------------------------


def test_param_shapes_use_the_public_names_and_layouts():
    # Llama-3-8B's shapes (n_kv_head 8 of 32 heads, ffn 14336), per the public checkpoint
    cfg = llama.LlamaConfig(1, 4096, 32, 8, 128256, 14336, 8192)
    assert llama.param_shapes(cfg) == {
        "model.embed_tokens.weight": (128256, 4096),
        "model.layers.0.input_layernorm.weight": (4096,),
        "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
        "model.layers.0.self_attn.k_proj.weight": (1024, 4096),  # (out, in)
        "model.layers.0.self_attn.v_proj.weight": (1024, 4096),
        "model.layers.0.self_attn.o_proj.weight": (4096, 4096),
        "model.layers.0.post_attention_layernorm.weight": (4096,),
        "model.layers.0.mlp.gate_proj.weight": (14336, 4096),
        "model.layers.0.mlp.up_proj.weight": (14336, 4096),
        "model.layers.0.mlp.down_proj.weight": (4096, 14336),
        "model.norm.weight": (4096,),
        "lm_head.weight": (128256, 4096),
    }
    shapes = llama.param_shapes(CFG)
    assert len(shapes) == 3 + 9 * CFG.n_layer
    assert llama.n_layers(shapes) == CFG.n_layer
    assert llama.llama_ffn_dim(4096) == 11008  # Llama 2 7B's width (multiple_of 256)
    from harness.config import llama_ffn_dim
    assert all(llama_ffn_dim(c, m) == llama.llama_ffn_dim(c, m)
               for c in (48, 96, 4096, 5120) for m in (32, 256))


def test_config_checks():
    with pytest.raises(ValueError, match="n_kv_head = 4 does not divide n_head = 6"):
        llama.LlamaConfig(1, 48, 6, 4, 10, 8, 8)
    with pytest.raises(ValueError, match="head_dim = 5 must be even"):
        llama.LlamaConfig(1, 20, 4, 2, 10, 8, 8)
    with pytest.raises(ValueError, match="rope: head_dim = 5 must be even"):
        ops.rope(jnp.zeros((1, 2, 1, 5)), 1e4)
    with pytest.raises(ValueError, match="n_kv_head = 4 does not divide n_head = 6"):
        ops.gqa_attention(jnp.zeros((1, 2, 6, 4)), jnp.zeros((1, 2, 4, 4)),
                          jnp.zeros((1, 2, 4, 4)))


# ---- numpy float64, written from docs/model.md ---------------------------------------------------


def np_forward(p, x_BT, cfg):
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}
    B, T = x_BT.shape
    C, NH, NKV = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    HS, half, group = C // NH, C // NH // 2, NH // NKV

    def rms(z, w):
        return z / np.sqrt((z * z).mean(-1, keepdims=True) + cfg.norm_eps) * w

    t = np.arange(T, dtype=np.float64)[:, None]
    ang = t * cfg.rope_theta ** (-2.0 * np.arange(half) / HS)  # (T, half)
    c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]

    def rope(z):
        a, b = z[..., :half], z[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    h = P["model.embed_tokens.weight"][np.asarray(x_BT)]
    for i in range(cfg.n_layer):
        q = lambda n: P[f"model.layers.{i}.{n}"]  # noqa: E731
        a = rms(h, q("input_layernorm.weight"))
        Q = rope((a @ q("self_attn.q_proj.weight").T).reshape(B, T, NH, HS))
        K = rope((a @ q("self_attn.k_proj.weight").T).reshape(B, T, NKV, HS))
        V = (a @ q("self_attn.v_proj.weight").T).reshape(B, T, NKV, HS)
        o = np.zeros((B, T, NH, HS))
        for n in range(NH):
            j = n // group
            sc = np.einsum("bth,buh->btu", Q[:, :, n], K[:, :, j]) / math.sqrt(HS)
            sc = np.where(np.tril(np.ones((T, T), bool)), sc, -np.inf)
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            o[:, :, n] = np.einsum("btu,buh->bth", pr, V[:, :, j])
        h = h + o.reshape(B, T, C) @ q("self_attn.o_proj.weight").T
        a = rms(h, q("post_attention_layernorm.weight"))
        g, u = a @ q("mlp.gate_proj.weight").T, a @ q("mlp.up_proj.weight").T
        h = h + (g / (1 + np.exp(-g)) * u) @ q("mlp.down_proj.weight").T
    return rms(h, P["model.norm.weight"]) @ P["lm_head.weight"].T


@pytest.mark.parametrize("T", [1, 9])
def test_forward_and_loss_match_numpy_float64(T):
    p = init_params(CFG, seed=2, std=0.2)
    x, y = tokens(CFG, (2, T), seed=3), tokens(CFG, (2, T), seed=4)
    want = np_forward(p, np.asarray(x), CFG)
    got = llama.forward(p, x, CFG)
    assert got.shape == (2, T, CFG.vocab_size) and got.dtype == jnp.float32
    assert rel_l2(got, want) < 2e-6
    lp = want - want.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    want_loss = -np.take_along_axis(lp, np.asarray(y)[..., None], -1).mean()
    assert float(llama.loss_fn(p, x, y, CFG)) == pytest.approx(want_loss, rel=2e-6)


def test_jit_matches_eager_and_grads_cover_every_tensor():
    p = init_params(CFG, seed=5)
    x, y = tokens(CFG, (2, 7), seed=6), tokens(CFG, (2, 7), seed=7)
    l_e, g_e = llama.loss_and_grads(p, x, y, CFG)
    l_j, g_j = jax.jit(llama.loss_and_grads, static_argnums=3)(p, x, y, CFG)
    assert float(l_e) == pytest.approx(float(l_j), rel=1e-6)
    assert set(g_j) == set(p)
    for k in p:
        assert g_j[k].shape == p[k].shape
        assert rel_l2(g_j[k], g_e[k]) < 1e-5, k
        assert float(jnp.abs(g_j[k]).max()) > 0, f"{k}: zero gradient"


def test_accumulated_grads_equal_full_batch():
    p = init_params(CFG, seed=8)
    x, y = tokens(CFG, (4, 6), seed=9), tokens(CFG, (4, 6), seed=10)
    loss, grads = jax.jit(llama.loss_and_grads, static_argnums=3)(p, x, y, CFG)
    acc = jax.jit(llama.accumulated_loss_and_grads, static_argnums=3)
    l2, g2 = acc(p, x.reshape(2, 2, 6), y.reshape(2, 2, 6), CFG)
    assert float(l2) == pytest.approx(float(loss), rel=1e-6)
    for k in p:
        assert rel_l2(g2[k], grads[k]) < 1e-5, k
    with pytest.raises(ValueError, match="targets shape"):
        llama.accumulated_loss_and_grads(p, x.reshape(2, 2, 6), y, CFG)


# ---- RoPE ---------------------------------------------------------------------------------------


def test_rope_is_the_identity_at_position_zero():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3, 8)), jnp.float32)
    y = ops.rope(x, 1e4)
    np.testing.assert_array_equal(np.asarray(y[:, 0]), np.asarray(x[:, 0]))
    assert rel_l2(y[:, 1:], x[:, 1:]) > 0.1


def test_rope_is_the_half_split_rotate_half_form():
    """x·[cos, cos] + rotate_half(x)·[sin, sin], rotate_half(x) = [-x2, x1]: channel i pairs
    with i + HS/2 and turns by t·theta^(-2i/HS)."""
    rng = np.random.default_rng(1)
    B, T, N, H, theta = 1, 6, 2, 8, 300.0
    x = rng.normal(size=(B, T, N, H))
    inv = theta ** (-np.arange(0, H, 2) / H)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = (np.concatenate([f(ang), f(ang)], -1)[None, :, None, :] for f in (np.cos, np.sin))
    rot = np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1)
    want = x * cos + rot * sin
    got = ops.rope(jnp.asarray(x, jnp.float32), theta)
    assert rel_l2(got, want) < 1e-6


def test_rope_scores_depend_only_on_the_distance():
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=8), rng.normal(size=8)
    T = 12
    Q = ops.rope(jnp.asarray(np.tile(q, (1, T, 1, 1)), jnp.float32), 1e4)[0, :, 0]
    K = ops.rope(jnp.asarray(np.tile(k, (1, T, 1, 1)), jnp.float32), 1e4)[0, :, 0]
    s = np.asarray(Q @ K.T, np.float64)
    for d in range(-3, 4):  # every pair (t, t - d) gives the same score
        diag = np.diagonal(s, offset=-d)
        np.testing.assert_allclose(diag, diag[0], rtol=0, atol=2e-5)


# ---- grouped-query attention ---------------------------------------------------------------------


def test_gqa_with_n_kv_head_equal_to_n_head_is_multi_head_attention():
    rng = np.random.default_rng(3)
    B, T, NH, HS = 2, 7, 3, 8
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, NH, HS)), jnp.float32) for _ in range(3))
    got = ops.gqa_attention(q, k, v).reshape(B, T, NH * HS)
    qkv = jnp.concatenate([t.reshape(B, T, NH * HS) for t in (q, k, v)], -1)
    want = ops.attention(qkv, NH)  # the GPT-2 op: packed q, k, v of NH heads
    assert rel_l2(got, want) < 1e-6


def test_gqa_shares_each_kv_head_with_consecutive_query_heads():
    rng = np.random.default_rng(4)
    B, T, NH, NKV, HS = 1, 5, 6, 2, 4
    q = jnp.asarray(rng.normal(size=(B, T, NH, HS)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, NKV, HS)), jnp.float32) for _ in range(2))
    rep = np.array([0, 0, 0, 1, 1, 1])  # query head n -> kv head n // (NH / NKV)
    want = ops.gqa_attention(q, k[:, :, rep], v[:, :, rep])
    assert rel_l2(ops.gqa_attention(q, k, v), want) < 1e-7
    # an MQA model (one kv head) matches the same model with its kv head copied NH times
    one = ops.gqa_attention(q, k[:, :, :1], v[:, :, :1])
    assert rel_l2(one, ops.gqa_attention(q, k[:, :, [0] * NH], v[:, :, [0] * NH])) < 1e-7


def test_model_with_copied_kv_heads_equals_its_mha_twin():
    """A GQA model equals the MHA model whose k/v projections repeat each kv head's rows for
    its group: the head mapping of the whole model, not only of the op."""
    p = init_params(CFG, seed=11, std=0.2)
    mha_cfg = llama.LlamaConfig(CFG.n_layer, CFG.n_embd, CFG.n_head, CFG.n_head, CFG.vocab_size,
                                CFG.ffn_dim, CFG.n_positions, CFG.rope_theta, CFG.norm_eps)
    HS, group = CFG.head_dim, CFG.n_head // CFG.n_kv_head
    q = dict(p)
    for i in range(CFG.n_layer):
        for w in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{w}.weight"
            heads = p[name].reshape(CFG.n_kv_head, HS, CFG.n_embd)
            q[name] = jnp.repeat(heads, group, axis=0).reshape(CFG.n_embd, CFG.n_embd)
    x = tokens(CFG, (2, 8), seed=12)
    assert rel_l2(llama.forward(q, x, mha_cfg), llama.forward(p, x, CFG)) < 1e-6


# ---- a public-layout safetensors file ---------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_public_layout_safetensors_round_trip(tmp_path, dtype):
    """Written under the public names and (out, in) shapes, read back with harness/init.py's
    reader (BF16, as the public files store it, widened exactly to fp32), the model gives the
    logits of the tensors it was written from."""
    import ml_dtypes

    p = {k: np.asarray(v) for k, v in init_params(CFG, seed=13).items()}
    if dtype == "BF16":
        p = {k: v.astype(ml_dtypes.bfloat16) for k, v in p.items()}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, p, metadata={"format": "pt"})
    back = read_safetensors(path)
    assert list(back) == list(llama.param_shapes(CFG))
    assert {k: v.shape for k, v in back.items()} == llama.param_shapes(CFG)
    assert all(v.dtype == np.float32 for v in back.values())
    x = tokens(CFG, (1, 6), seed=14)
    want = llama.forward({k: jnp.asarray(np.asarray(v, np.float32)) for k, v in p.items()}, x,
                         CFG)
    got = llama.forward({k: jnp.asarray(v) for k, v in back.items()}, x, CFG)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
