"""Tests for reference/: ops and the whole model against plain numpy float64, jit vs eager,
rank promotion set to raise, gradients against float64 finite differences (in a subprocess with
x64 on), AdamW against a hand-computed numpy step, and gradient accumulation vs full batch.
The GPipe baseline is tested in test_pipeline.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import (AdamWConfig, GPTConfig, accumulated_loss_and_grads, adamw_init,
                       adamw_update, forward, loss_and_grads, loss_fn, make_train_step, n_layers,
                       ops, param_shapes, run_trajectory, set_precision)

REPO = Path(__file__).resolve().parents[2]
CFG = GPTConfig(n_layer=2, n_embd=72, n_head=3, vocab_size=311, n_positions=11)  # HS = 24
TINY = GPTConfig(n_layer=2, n_embd=24, n_head=3, vocab_size=37, n_positions=8)


@pytest.fixture(autouse=True)
def _strict_jax():
    # Rank promotion raises (as in nanodo's tests); "highest" keeps fp32 matmuls fp32 on GPUs.
    with jax.numpy_rank_promotion("raise"), jax.default_matmul_precision("highest"):
        yield


def init_params(cfg, seed=0, std=0.02):
    """Small seeded init for tests only (the project's init is harness/init.py). Biases and LN
    parameters are random too so that every term of the maths is exercised."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        is_ln_weight = name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight"
        w = 1.0 + rng.normal(0.0, 0.1, shape) if is_ln_weight else rng.normal(0.0, std, shape)
        params[name] = jnp.asarray(w, jnp.float32)
    return params


def tokens(cfg, shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------- numpy float64 reference

def np_layernorm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def np_attention(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = np.zeros((B, T, C))
    for b in range(B):
        for n in range(n_head):
            cols = slice(n * hs, (n + 1) * hs)
            for t in range(T):
                s = k[b, :t + 1, cols] @ q[b, t, cols] / math.sqrt(hs)
                p = np.exp(s - s.max())
                out[b, t, cols] = (p / p.sum()) @ v[b, :t + 1, cols]
    return out


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_cross_entropy(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


def np_forward(params, toks, cfg):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    toks = np.asarray(toks)
    h = p["wte.weight"][toks] + p["wpe.weight"][: toks.shape[1]]
    for i in range(cfg.n_layer):
        g = lambda k: p[f"h.{i}.{k}"]
        qkv = np_layernorm(h, g("ln_1.weight"), g("ln_1.bias")) @ g("attn.c_attn.weight") \
            + g("attn.c_attn.bias")
        h = h + np_attention(qkv, cfg.n_head) @ g("attn.c_proj.weight") + g("attn.c_proj.bias")
        m = np_layernorm(h, g("ln_2.weight"), g("ln_2.bias")) @ g("mlp.c_fc.weight") \
            + g("mlp.c_fc.bias")
        h = h + np_gelu(m) @ g("mlp.c_proj.weight") + g("mlp.c_proj.bias")
    return np_layernorm(h, p["ln_f.weight"], p["ln_f.bias"]) @ p["wte.weight"].T


def f64(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------- ops

@pytest.mark.parametrize("T", [1, 7])
def test_ops_match_numpy_float64(T):
    rng = np.random.default_rng(T)
    B, C, V, NH = 2, 72, 311, 3
    f32 = lambda *s, scale=1.0: jnp.asarray(rng.normal(0, scale, s), jnp.float32)
    wte, wpe, toks = f32(V, C), f32(11, C), tokens(CFG, (B, T))
    np.testing.assert_allclose(ops.encoder(wte, wpe, toks),
                               f64(wte)[np.asarray(toks)] + f64(wpe)[:T], rtol=1e-6, atol=1e-6)
    x, w, b = f32(B, T, C, scale=3.0), f32(C), f32(C)
    np.testing.assert_allclose(ops.layernorm(x, w, b), np_layernorm(f64(x), f64(w), f64(b)),
                               rtol=1e-5, atol=1e-5)
    W, bias = f32(C, 3 * C, scale=0.1), f32(3 * C)
    np.testing.assert_allclose(ops.matmul(x, W, bias), f64(x) @ f64(W) + f64(bias),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.matmul(x, W), f64(x) @ f64(W), rtol=1e-5, atol=1e-5)
    qkv = f32(B, T, 3 * C)
    np.testing.assert_allclose(ops.attention(qkv, NH), np_attention(f64(qkv), NH),
                               rtol=1e-5, atol=1e-5)
    g = f32(B, T, 4 * C, scale=3.0)
    np.testing.assert_allclose(ops.gelu(g), np_gelu(f64(g)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.residual(x, g[..., :C]), f64(x) + f64(g[..., :C]), rtol=1e-7)
    np.testing.assert_allclose(ops.lm_head(x, wte), f64(x) @ f64(wte).T, rtol=1e-5, atol=1e-4)
    logits, targets = f32(B, T, V, scale=4.0), tokens(CFG, (B, T), seed=T + 5)
    np.testing.assert_allclose(ops.softmax_cross_entropy(logits, targets),
                               np_cross_entropy(f64(logits), np.asarray(targets)), rtol=1e-6)


def test_attention_is_causal_and_checks_heads():
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 36)), jnp.float32)
    changed = qkv.at[:, 3:].set(7.0)  # future positions must not affect earlier outputs
    np.testing.assert_array_equal(ops.attention(qkv, 3)[:, :3], ops.attention(changed, 3)[:, :3])
    with pytest.raises(ValueError, match="divisible by n_head=5"):
        ops.attention(qkv, 5)
    with pytest.raises(ValueError, match="T=12 exceeds n_positions=11"):
        ops.encoder(jnp.zeros((5, 4)), jnp.zeros((11, 4)), jnp.zeros((1, 12), jnp.int32))


# ---------------------------------------------------------------- model

def test_param_shapes_table_order_and_layer_count():
    shapes = param_shapes(CFG)
    names = list(shapes)
    assert names[:4] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias"]
    assert names[-2:] == ["ln_f.weight", "ln_f.bias"] and len(names) == 4 + 12 * CFG.n_layer
    assert shapes["h.1.attn.c_attn.weight"] == (72, 216) and shapes["h.1.mlp.c_proj.weight"] == (
        288, 72)
    assert shapes["wte.weight"] == (311, 72) and shapes["wpe.weight"] == (11, 72)
    assert n_layers(init_params(CFG)) == 2
    with pytest.raises(ValueError, match="not 0..L-1"):
        n_layers({"h.1.ln_1.weight": 0})


@pytest.mark.parametrize("T", [1, 11])
def test_forward_and_loss_match_numpy_float64(T):
    params, toks, tgts = init_params(CFG, std=0.1), tokens(CFG, (2, T)), tokens(CFG, (2, T), 2)
    logits = forward(params, toks, CFG)
    assert logits.shape == (2, T, 311) and logits.dtype == jnp.float32
    want = np_forward(params, toks, CFG)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=2e-5)
    assert abs(float(loss_fn(params, toks, tgts, CFG)) - np_cross_entropy(want, np.asarray(tgts))
               ) < 1e-5


def test_any_config_object_and_layer_count_from_params():
    params, toks = init_params(CFG), tokens(CFG, (1, 4))
    ns = types.SimpleNamespace(**vars(CFG))
    np.testing.assert_array_equal(forward(params, toks, ns), forward(params, toks, CFG))
    one = {k: v for k, v in params.items() if not k.startswith("h.1.")}
    assert forward(one, toks, CFG).shape == (1, 4, 311)


def test_jit_matches_eager():
    params, toks, tgts = init_params(TINY), tokens(TINY, (2, 6)), tokens(TINY, (2, 6), 2)
    eager = loss_and_grads(params, toks, tgts, TINY)
    jitted = jax.jit(loss_and_grads, static_argnums=3)(params, toks, tgts, TINY)
    np.testing.assert_allclose(jax.jit(forward, static_argnums=2)(params, toks, TINY),
                               forward(params, toks, TINY), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    for k in params:
        assert rel_l2(jitted[1][k], eager[1][k]) < 1e-6, k


def test_rank_promotion_raise_is_active():
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones((2, 3)) + jnp.ones((3,))


def test_accumulated_grads_equal_full_batch():
    params = init_params(CFG)
    toks, tgts = tokens(CFG, (8, 6)), tokens(CFG, (8, 6), 2)
    loss, grads = jax.jit(loss_and_grads, static_argnums=3)(params, toks, tgts, CFG)
    acc = jax.jit(accumulated_loss_and_grads, static_argnums=3)
    loss_m, grads_m = acc(params, toks.reshape(4, 2, 6), tgts.reshape(4, 2, 6), CFG)
    assert abs(float(loss_m) - float(loss)) <= 1e-6 * abs(float(loss))
    for k in params:
        assert rel_l2(grads_m[k], grads[k]) < 1e-6, k
    with pytest.raises(ValueError, match="targets shape"):
        acc(params, toks.reshape(4, 2, 6), tgts.reshape(2, 4, 6), CFG)


_FD_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
import jax.numpy as jnp, numpy as np
from reference import GPTConfig, loss_and_grads, loss_fn, param_shapes
cfg = GPTConfig(n_layer=2, n_embd=12, n_head=3, vocab_size=13, n_positions=7)
rng = np.random.default_rng(0)
params = {k: jnp.asarray((1.0 if k.endswith("ln_1.weight") or k.endswith("ln_2.weight")
                          or k == "ln_f.weight" else 0.0) + rng.normal(0, 0.3, s), jnp.float64)
          for k, s in param_shapes(cfg).items()}
toks = jnp.asarray(rng.integers(0, 13, (2, 5)), jnp.int32)
tgts = jnp.asarray(rng.integers(0, 13, (2, 5)), jnp.int32)
loss, grads = loss_and_grads(params, toks, tgts, cfg)
assert loss.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in grads.values())
f = jax.jit(loss_fn, static_argnums=3)
eps, worst = 1e-5, 0.0
for k, p in params.items():
    flat = np.asarray(p).ravel()
    idx = {0, flat.size - 1, int(rng.integers(flat.size))}
    if k == "wte.weight":  # a row used by both the embedding and the LM head
        idx.add(int(toks[0, 0]) * p.shape[1] + 1)
    for j in idx:
        def at(d):
            q = flat.copy(); q[j] += d
            return float(f({**params, k: jnp.asarray(q.reshape(p.shape))}, toks, tgts, cfg))
        fd = (at(eps) - at(-eps)) / (2 * eps)
        ad = float(np.asarray(grads[k]).ravel()[j])
        err = abs(fd - ad) / (abs(ad) + 1e-4)
        worst = max(worst, err)
        assert err < 1e-6, (k, j, fd, ad)
print("FD_OK", worst)
"""


def run_python(code, **env):
    """Run `code` in a fresh interpreter (for flags that must be set before jax starts), on CPU:
    the maths is what is checked, and a GPU is already held by this process's jax."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_grads_match_float64_finite_differences():
    assert "FD_OK" in run_python(_FD_SCRIPT)


# ---------------------------------------------------------------- AdamW

def np_adamw(params, grads, m, v, t, cfg):
    """docs/model.md's update in float64 numpy, one step (t starts at 1)."""
    n = math.sqrt(sum(float((f64(g) ** 2).sum()) for g in grads.values()))
    scale = cfg.grad_clip / n if cfg.grad_clip > 0 and n > cfg.grad_clip else 1.0
    out_p, out_m, out_v = {}, {}, {}
    for k, p in params.items():
        g, p = f64(grads[k]) * scale, f64(p)
        out_m[k] = cfg.beta1 * m[k] + (1 - cfg.beta1) * g
        out_v[k] = cfg.beta2 * v[k] + (1 - cfg.beta2) * g * g
        mh, vh = out_m[k] / (1 - cfg.beta1 ** t), out_v[k] / (1 - cfg.beta2 ** t)
        lam = cfg.weight_decay if p.ndim >= 2 else 0.0
        out_p[k] = p - cfg.lr * (mh / (np.sqrt(vh) + cfg.eps) + lam * p)
    return out_p, out_m, out_v, n


@pytest.mark.parametrize("grad_clip", [0.05, 1e3, 0.0], ids=["clipped", "unclipped", "off"])
def test_adamw_matches_numpy(grad_clip):
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1, grad_clip=grad_clip)
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 7), "b": (7,), "e": (3, 2, 4)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    state = adamw_init(params)
    np_p = {k: f64(v) for k, v in params.items()}
    np_m = {k: np.zeros(s) for k, s in shapes.items()}
    np_v = {k: np.zeros(s) for k, s in shapes.items()}
    update = jax.jit(adamw_update, static_argnums=3)
    for t in (1, 2, 3):
        grads = {k: jnp.asarray(rng.normal(0, 0.1, s), jnp.float32) for k, s in shapes.items()}
        params, state, norm = update(params, grads, state, cfg)
        np_p, np_m, np_v, np_norm = np_adamw(np_p, grads, np_m, np_v, t, cfg)
        assert int(state.step) == t and abs(float(norm) - np_norm) < 1e-6 * np_norm
        if grad_clip == 0.05:
            assert np_norm > grad_clip  # clipping really was active
        for k in shapes:
            np.testing.assert_allclose(params[k], np_p[k], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(state.m[k], np_m[k], rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(state.v[k], np_v[k], rtol=1e-5, atol=1e-11)


def test_adamw_decays_only_rank_2_and_up():
    cfg = AdamWConfig(lr=0.5, weight_decay=0.1)
    params = {"w": jnp.full((2, 3), 2.0), "b": jnp.full((3,), 2.0), "e": jnp.full((1, 1, 2), 2.0)}
    zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
    new, _, norm = adamw_update(params, zeros, adamw_init(params), cfg)
    assert float(norm) == 0.0
    np.testing.assert_array_equal(new["b"], params["b"])  # rank 1: untouched
    np.testing.assert_allclose(new["w"], 2.0 * (1 - 0.5 * 0.1), rtol=1e-7)
    np.testing.assert_allclose(new["e"], 2.0 * (1 - 0.5 * 0.1), rtol=1e-7)


# ---------------------------------------------------------------- training step

def test_train_step_and_trajectory():
    set_precision()
    assert jax.config.jax_default_matmul_precision == "highest"
    assert not jax.config.jax_enable_x64
    # eps well above the round-off in gradients that are zero in exact arithmetic (c_attn's key
    # bias: softmax ignores it): with eps=1e-8 Adam's update there is lr * noise/|noise|, and two
    # compilations of the same maths (jit vs jit on GPU, jit vs eager) then differ by up to lr.
    cfg, opt = TINY, AdamWConfig(lr=1e-2, eps=1e-4)
    params = init_params(cfg)
    data = [(tokens(cfg, (4, 8), s), tokens(cfg, (4, 8), s + 100)) for s in range(3)]
    final, losses = run_trajectory(params, data, cfg, opt, microbatches=2)
    assert losses.shape == (3,) and np.all(np.isfinite(losses))
    # The same steps by hand: accumulate over 2 micro-batches, then AdamW.
    acc = jax.jit(accumulated_loss_and_grads, static_argnums=3)
    update = jax.jit(adamw_update, static_argnums=3)
    state, p = adamw_init(params), params
    for t, (toks, tgts) in enumerate(data):
        loss, grads = acc(p, toks.reshape(2, 2, 8), tgts.reshape(2, 2, 8), cfg)
        assert abs(float(loss) - losses[t]) < 1e-6 * abs(losses[t])
        p, state, _ = update(p, grads, state, opt)
    for k in params:
        assert rel_l2(final[k], p[k]) < 1e-5, k
    step = make_train_step(cfg, opt, microbatches=3)
    with pytest.raises(ValueError, match="not divisible by microbatches=3"):
        step(params, adamw_init(params), *data[0])
