"""The attention kernels (GPT-2's td_op_attention_*, the Llama family's td_op_gqa_attention_*)
on both of their paths: the per-row loops
(small heads: T^2 * head size below 64 * 64 * 32) and the per-head GEMMs in 64-row blocks (the
cpu-perf shapes). The parity suites' models are all small enough for the loops, so this holds
the GEMM path to jax.vjp of reference ops.attention at the op tier's fp32 gate: one block, two,
a partial last block, T not a multiple of anything, head sizes 32 and 64, and the loop path's
smoke shape beside them. The saved probabilities must be exactly zero above the diagonal.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness import tolerances as tol
from harness.engine import Ops
from harness.parity_ops import _vjp_attention
from harness.parity_ops_llama import _vjp_gqa
from reference import set_precision

# (B, T, C, NH): head size C / NH
SHAPES = {
    "loops-t32-hs16": (2, 32, 64, 4),
    "gemm-t64-hs32": (2, 64, 128, 4),
    "gemm-t64-hs64": (2, 64, 128, 2),
    "gemm-t128-hs64": (2, 128, 256, 4),
    "gemm-t97-hs64": (1, 97, 128, 2),
    "gemm-t200-hs32": (1, 200, 64, 2),
}


@pytest.mark.parametrize("name", SHAPES)
def test_attention_matches_jax(name):
    set_precision()
    B, T, C, NH = SHAPES[name]
    rng = np.random.default_rng([7, T, C])
    qkv = rng.normal(0.0, 1.0, (B, T, 3 * C)).astype(np.float32)
    dout = rng.normal(0.0, 1.0, (B, T, C)).astype(np.float32)
    k = Ops()
    out, att = k.attention_forward(qkv, NH)
    dqkv = k.attention_backward(dout, qkv, att, NH)
    want, g_qkv = _vjp_attention(qkv, dout, NH)
    gate = tol.tolerance("fp32", "op", "op")
    for what, got, ref in (("out", out, want), ("dqkv", dqkv, g_qkv)):
        err = tol.error_for(tol.measure(got, np.asarray(ref)), gate)
        assert err <= gate.value, f"{name} {what}: {gate.metric} {err:.3g} > {gate.value}"
    upper = np.triu(np.ones((T, T), bool), 1)
    assert not att[:, :, upper].any(), "probabilities above the diagonal must be 0"
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-5)


# grouped-query shapes (B, T, NH, NKV, HS): the query heads of a group share k and v, so dk and
# dv sum over the group; MQA and MHA beside GQA, the loops' shape as the control
GQA_SHAPES = {
    "loops-t32-hs16-g2": (2, 32, 4, 2, 16),
    "gemm-t64-hs32-g3": (2, 64, 6, 2, 32),
    "gemm-t128-hs64-g3": (1, 128, 6, 2, 64),
    "gemm-t97-hs64-mqa": (1, 97, 4, 1, 64),
    "gemm-t80-hs64-mha": (2, 80, 2, 2, 64),
}


@pytest.mark.parametrize("name", GQA_SHAPES)
def test_gqa_attention_matches_jax(name):
    set_precision()
    B, T, NH, NKV, HS = GQA_SHAPES[name]
    rng = np.random.default_rng([11, T, NH, NKV])
    q = rng.normal(0.0, 1.0, (B, T, NH, HS)).astype(np.float32)
    kk = rng.normal(0.0, 1.0, (B, T, NKV, HS)).astype(np.float32)
    v = rng.normal(0.0, 1.0, (B, T, NKV, HS)).astype(np.float32)
    dout = rng.normal(0.0, 1.0, (B, T, NH, HS)).astype(np.float32)
    k = Ops()
    out, att = k.gqa_attention_forward(q, kk, v)
    dq, dk, dv = k.gqa_attention_backward(dout, q, kk, v, att)
    want, (g_q, g_k, g_v) = _vjp_gqa(q, kk, v, dout)
    gate = tol.tolerance("fp32", "op", "op")
    for what, got, ref in (("out", out, want), ("dq", dq, g_q), ("dk", dk, g_k), ("dv", dv, g_v)):
        err = tol.error_for(tol.measure(got, np.asarray(ref)), gate)
        assert err <= gate.value, f"{name} {what}: {gate.metric} {err:.3g} > {gate.value}"
    upper = np.triu(np.ones((T, T), bool), 1)
    assert not att[:, :, upper].any(), "probabilities above the diagonal must be 0"
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-5)
