"""The Llama family's kernels (engine/src/llama_ops.c through td_op_*): op-tier parity against
reference/ops.py and jax.vjp at the op tier's fp32 gate (and one block composed from them
against reference.llama.block), finite differences of every input gradient on the float64
build, the argument checks, and proof that the op tier's inputs tell the usual wrong variants
apart (theta, the interleaved RoPE pairing, a missing 1/sqrt(HS), a wrong query-to-kv-head
map) by far more than the gate.

Finite differences: L = sum(r * op(x)) for a seeded r, so dL/dx is the op's backward with
dout = r. In float64 the central difference's truncation error falls as e^2 (~1e-10 relative
at e = 1e-5) and its rounding (1e-16 * |L| / e) stays below 1e-9, so TOL = 1e-6 fails on any
wrong term (those are >= 1e-3) and never on rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness import tolerances as tol
from harness.engine import Ops
from harness.errors import EngineError
from harness.parity_ops_llama import op_comparisons
from reference import ops, set_precision
from reference.llama import LlamaConfig

STEP = 1e-5
TOL = 1e-6
PICKS = 6  # elements per input: the largest |gradient| and 5 seeded random ones

# C48 NH6 (HS 8) NKV2 (groups of 3), F80, odd V: GQA proper; then HS 6 with MQA, and MHA
SHAPES = {
    "gqa": LlamaConfig(2, 48, 6, 2, 311, 80, 32, rope_theta=500.0, norm_eps=1e-5),
    "mqa-hs6": LlamaConfig(1, 36, 6, 1, 17, 52, 16, rope_theta=10000.0, norm_eps=1e-6),
    "mha": LlamaConfig(1, 32, 4, 4, 17, 40, 16, rope_theta=1e4, norm_eps=1e-5),
}


@pytest.fixture(scope="module", autouse=True)
def _precision():
    set_precision()


@pytest.mark.parametrize("T", [13, 1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_llama_ops_match_jax_vjp(shape, T):
    gate = tol.tolerance("fp32", "op", "op")
    rows = list(op_comparisons(SHAPES[shape], 2, T, seed=3))
    names = {n.split("[T=")[0] for n, _, _ in rows}
    assert {"op/rmsnorm", "op/rope[q]", "op/rope[k]", "op/swiglu", "op/gqa_attention",
            "op/llama-block"} <= names
    # 4 projections, rmsnorm 3, rope 2 x 2, swiglu 3, attention 4; the block: out, dx, 9 weights
    assert len(rows) == 4 + 3 + 4 + 3 + 4 + 2 + 9
    bad = {}
    for name, got, want in rows:
        err = tol.error_for(tol.measure(got, want), gate)
        if not err <= gate.value:
            bad[name] = f"{err:.2e}"
    assert not bad, f"above the op gate {gate.value:g}: {bad}"


# ---- finite differences on the float64 build ----------------------------------------------------


@pytest.fixture(scope="module")
def f64():
    o = Ops.for_variant("f64")
    assert o._real() is np.float64
    return o


def _check_fd(f, inputs: dict, grads: dict, r: np.ndarray, seed: int) -> dict:
    """Relative L2 error of `grads` (analytic, dL/d input) against central differences of
    L = sum(r * f(**inputs)) on PICKS elements of each input."""
    rng = np.random.default_rng(seed)
    errors = {}
    for name, x in inputs.items():
        g = grads[name].ravel()
        picks = [int(np.argmax(np.abs(g)))] + [int(i) for i in rng.choice(x.size, PICKS - 1)]
        fd = []
        for i in picks:
            vals = []
            for sgn in (1, -1):
                xp = x.copy().ravel()
                xp[i] += sgn * STEP
                vals.append(float(np.sum(r * f(**{**inputs, name: xp.reshape(x.shape)}))))
            fd.append((vals[0] - vals[1]) / (2 * STEP))
        an = g[picks]
        assert np.linalg.norm(an) > 0, f"{name}: zero gradient on the sampled elements"
        errors[name] = float(np.linalg.norm(np.array(fd) - an) / np.linalg.norm(an))
    return errors


def _assert_small(errors: dict, what: str) -> None:
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < TOL}
    assert not bad, f"{what}: finite differences differ by more than {TOL:g}: {bad}"


def test_rmsnorm_gradients_finite_differences(f64):
    rng = np.random.default_rng(1)
    x, w = rng.normal(0.5, 2.0, (5, 12)), 1.0 + 0.3 * rng.normal(size=12)
    r = rng.normal(size=x.shape)
    _, rstd = f64.rmsnorm_forward(x, w, 1e-5)
    dx, dw = f64.rmsnorm_backward(r, x, w, rstd)
    _assert_small(_check_fd(lambda x, w: f64.rmsnorm_forward(x, w, 1e-5)[0], {"x": x, "w": w},
                            {"x": dx, "w": dw}, r, 2), "rmsnorm")


def test_rope_gradients_finite_differences(f64):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 7, 3, 8))
    r = rng.normal(size=x.shape)
    dx = f64.rope_backward(r, 500.0)
    _assert_small(_check_fd(lambda x: f64.rope_forward(x, 500.0), {"x": x}, {"x": dx}, r, 4),
                  "rope")
    # a rotation: the backward inverts the forward exactly
    np.testing.assert_allclose(f64.rope_backward(f64.rope_forward(x, 500.0), 500.0), x,
                               rtol=0, atol=1e-13)


def test_swiglu_gradients_finite_differences(f64):
    rng = np.random.default_rng(5)
    gate, up = 3.0 * rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    r = rng.normal(size=gate.shape)
    dg, du = f64.swiglu_backward(r, gate, up)
    _assert_small(_check_fd(lambda gate, up: f64.swiglu_forward(gate, up),
                            {"gate": gate, "up": up}, {"gate": dg, "up": du}, r, 6), "swiglu")


@pytest.mark.parametrize("NH,NKV", [(6, 2), (4, 4), (3, 1)])
def test_gqa_attention_gradients_finite_differences(f64, NH, NKV):
    rng = np.random.default_rng(7 + NKV)
    B, T, HS = 2, 5, 4
    q, k = 1.5 * rng.normal(size=(B, T, NH, HS)), 1.5 * rng.normal(size=(B, T, NKV, HS))
    v = rng.normal(size=(B, T, NKV, HS))
    r = rng.normal(size=q.shape)
    _, att = f64.gqa_attention_forward(q, k, v)
    dq, dk, dv = f64.gqa_attention_backward(r, q, k, v, att)
    _assert_small(_check_fd(lambda q, k, v: f64.gqa_attention_forward(q, k, v)[0],
                            {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, r, 8),
                  f"gqa_attention NH={NH} NKV={NKV}")


def test_float64_and_fp32_builds_run_the_same_kernels(f64):
    """The fp32 outputs sit within fp32 rounding of the float64 ones (the FD tests above test
    the code the op tier checks)."""
    o32 = Ops()
    rng = np.random.default_rng(9)
    q, k, v = (rng.normal(size=(1, 6, h, 4)) for h in (4, 2, 2))
    x = rng.normal(size=(3, 16))
    pairs = [(o32.gqa_attention_forward(q, k, v)[0], f64.gqa_attention_forward(q, k, v)[0]),
             (o32.rope_forward(q, 1e4), f64.rope_forward(q, 1e4)),
             (o32.rmsnorm_forward(x, x[0], 1e-5)[0], f64.rmsnorm_forward(x, x[0], 1e-5)[0]),
             (o32.swiglu_forward(x, x[::-1]), f64.swiglu_forward(x, x[::-1]))]
    for a, b in pairs:
        assert a.dtype == np.float32 and b.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- argument checks --------------------------------------------------------------------------


def test_bad_arguments_name_the_value():
    o = Ops()
    with pytest.raises(EngineError, match=r"n_kv_head NKV=4 does not divide n_head NH=6"):
        o.gqa_attention_forward(np.zeros((1, 2, 6, 4)), np.zeros((1, 2, 4, 4)),
                                np.zeros((1, 2, 4, 4)))
    with pytest.raises(EngineError, match=r"head size HS=5 must be even"):
        o.rope_forward(np.zeros((1, 2, 1, 5)), 1e4)
    with pytest.raises(EngineError, match=r"theta=0 must be a finite number > 0"):
        o.rope_backward(np.zeros((1, 2, 1, 4)), 0.0)
    with pytest.raises(EngineError, match=r"eps=-1 must be a finite number > 0"):
        o.rmsnorm_forward(np.zeros((2, 4)), np.ones(4), -1.0)
    with pytest.raises(EngineError, match="do not fit"):
        o.gqa_attention_forward(np.zeros((1, 2, 6, 4)), np.zeros((1, 3, 2, 4)),
                                np.zeros((1, 3, 2, 4)))


def test_rope_is_identity_at_position_zero_and_keeps_norms():
    o = Ops()
    x = np.random.default_rng(2).normal(size=(2, 5, 3, 8)).astype(np.float32)
    y = o.rope_forward(x, 1e4)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    # each pair (i, i + HS/2) is rotated: its length is unchanged
    n = lambda a: np.hypot(a[..., :4], a[..., 4:])  # noqa: E731
    np.testing.assert_allclose(n(y), n(x), rtol=1e-6)


# ---- the op tier's inputs separate the wrong variants -------------------------------------------


def _rope_interleaved(x, theta):
    """The other RoPE convention (pairs 2i, 2i+1): what a kernel written from the paper does."""
    B, T, N, H = x.shape
    cos, sin = (jnp.asarray(t, x.dtype)[None, :, None, :] for t in ops.rope_tables(T, H, theta))
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)


def _gqa_variant(q, k, v, scale=True, modulo_map=False):
    B, T, NH, HS = q.shape
    NKV = k.shape[2]
    idx = np.arange(NH) % NKV if modulo_map else np.arange(NH) // (NH // NKV)
    s = jnp.einsum("btnh,bunh->bntu", q, k[:, :, idx]) / (math.sqrt(HS) if scale else 1.0)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, None], s, -jnp.inf)
    return jnp.einsum("bntu,bunh->btnh", jax.nn.softmax(s, -1), v[:, :, idx])


def test_op_tier_inputs_separate_wrong_variants():
    """On inputs drawn like the op tier's (same scales, T = 13, the gqa shape), each wrong
    variant differs from the reference by more than 100x the op gate; so a kernel implementing
    one fails the op tier. (The wrong theta, the interleaved pairing, the missing scale and the
    h % NKV map were also planted in llama_ops.c once each and failed
    test_llama_ops_match_jax_vjp.)"""
    gate = tol.tolerance("fp32", "op", "op").value
    cfg = SHAPES["gqa"]
    rng = np.random.default_rng(0)
    HS = cfg.n_embd // cfg.n_head
    x = rng.normal(size=(2, 13, cfg.n_head, HS)).astype(np.float32)
    want = ops.rope(x, cfg.rope_theta)
    q = 2.0 * rng.normal(size=(2, 13, cfg.n_head, HS)).astype(np.float32)
    k = 2.0 * rng.normal(size=(2, 13, cfg.n_kv_head, HS)).astype(np.float32)
    v = rng.normal(size=(2, 13, cfg.n_kv_head, HS)).astype(np.float32)
    att = ops.gqa_attention(q, k, v)
    xs = 2.0 * rng.normal(size=(26, cfg.n_embd)).astype(np.float32) + 0.5
    w = (1.0 + 0.1 * rng.normal(size=cfg.n_embd)).astype(np.float32)
    variants = {
        "rope theta 10000 instead of 500": (ops.rope(x, 10000.0), want),
        "rope interleaved pairs": (_rope_interleaved(x, cfg.rope_theta), want),
        "rope positions from 1": (ops.rope(np.concatenate([x[:, :1], x], 1), cfg.rope_theta)
                                  [:, 1:], want),
        "attention without 1/sqrt(HS)": (_gqa_variant(q, k, v, scale=False), att),
        "kv head h % NKV instead of h // (NH/NKV)": (_gqa_variant(q, k, v, modulo_map=True), att),
        "rmsnorm with the mean subtracted": (ops.layernorm(xs, w, np.zeros_like(w)),
                                             ops.rmsnorm(xs, w, cfg.norm_eps)),
    }
    # the variant helpers are right when they should be: the reference map and scale
    np.testing.assert_allclose(_gqa_variant(q, k, v), att, rtol=1e-5, atol=1e-6)
    for name, (got, ref) in variants.items():
        err = tol.measure(np.asarray(got), np.asarray(ref)).rel_l2
        assert err > 100 * gate, f"{name}: only {err:.1e} from the reference"


# ---- through `tandem parity` ---------------------------------------------------------------------


def test_parity_cli_runs_the_llama_op_tier(tmp_path, capsys):
    """An op-only llama case runs end to end (no weights, no tokens: the kernels draw their own
    inputs) and passes; the summary names only op rows."""
    import json

    from harness.cli import main

    rc = main(["parity", "--suite", "llama-ops", "--case", "mha-t1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((tmp_path / "parity_summary.json").read_text())
    tiers = summary["cases"]["mha-t1"]["tiers"]
    assert list(tiers) == ["op"] and tiers["op"]["compared"] == 29 and tiers["op"]["passed"]
    assert "op/gqa_attention[T=1].dk" in out or "more passed" in out
