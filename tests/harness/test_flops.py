"""harness/flops.py: the FLOPs formula against FACTS.md and against XLA's own count."""

from __future__ import annotations

import math

import pytest

from harness.flops import achieved_flops, flops_for_case, flops_per_token, mfu, param_count

GPT2_124M = dict(n_layer=12, n_embd=768, vocab_size=50257, n_positions=1024)


def test_gpt2_124m_param_count():
    # the public checkpoint: 124,439,808 parameters (tied LM head counted once)
    assert param_count(**GPT2_124M) == 124_439_808
    assert param_count(**GPT2_124M, include_wpe=False) == 124_439_808 - 1024 * 768


def test_gpt2_124m_flops_per_token_matches_facts():
    tandem = flops_per_token(**GPT2_124M, seq_len=1024)
    palm = flops_per_token(**GPT2_124M, seq_len=1024, convention="palm")
    # FACTS.md: 799 MFLOP/token (6N + 6LTC) and 856 (6N + 12LTC). Exactly: 798.5M and 855.2M
    # (FACTS rounds the latter up), so compare to 0.2 %.
    assert tandem == 6 * 123_653_376 + 6 * 12 * 1024 * 768 == 798_543_360
    assert tandem == pytest.approx(799e6, rel=2e-3)
    assert palm == pytest.approx(856e6, rel=2e-3)
    assert palm - tandem == 6 * 12 * 1024 * 768


def test_mfu_and_achieved():
    f = flops_per_token(**GPT2_124M, seq_len=1024)
    # FACTS.md: 343k tok/s on an H200 (bf16 peak 989 TFLOP/s) is ~28 % MFU
    assert mfu(f, 343e3, 989e12) == pytest.approx(0.277, abs=0.002)
    assert achieved_flops(f, 1000.0) == f * 1000.0
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(f, 1.0, 0.0)
    with pytest.raises(ValueError, match="convention = 'chinchilla'"):
        flops_per_token(**GPT2_124M, seq_len=8, convention="chinchilla")
    with pytest.raises(ValueError, match="seq_len = 2048 exceeds n_positions = 1024"):
        flops_per_token(**GPT2_124M, seq_len=2048)


def test_flops_for_case():
    from harness.config import load_suite

    c = load_suite("cpu-perf").case("gpt2-124m")
    assert flops_for_case(c) == flops_per_token(**GPT2_124M, seq_len=64)


def _xla_flops_per_token(L, C, NH, V, T, B):
    """XLA's FLOP count for one jitted forward + backward of a self-contained GPT-2 (the
    docs/model.md maths, written here so this test does not depend on reference/)."""
    import jax
    import jax.numpy as jnp

    HS = C // NH

    def ln(x, w, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + 1e-5) * w + b

    def gelu(x):
        return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def heads(z_BTC):
        return z_BTC.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)

    def loss(p, x_BT, y_BT):
        h = p["wte"][x_BT] + p["wpe"][:T]
        for q in p["h"]:
            qkv = ln(h, q["ln1w"], q["ln1b"]) @ q["attnw"] + q["attnb"]
            qq, kk, vv = (heads(z) for z in jnp.split(qkv, 3, -1))
            s = qq @ kk.transpose(0, 1, 3, 2) / math.sqrt(HS)
            s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
            o = (jax.nn.softmax(s, -1) @ vv).transpose(0, 2, 1, 3).reshape(B, T, C)
            h = h + o @ q["projw"] + q["projb"]
            m = ln(h, q["ln2w"], q["ln2b"]) @ q["fcw"] + q["fcb"]
            h = h + gelu(m) @ q["mprojw"] + q["mprojb"]
        logits = ln(h, p["lnfw"], p["lnfb"]) @ p["wte"].T
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(lp, y_BT[..., None], -1).mean()

    def s(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype)

    layer = dict(ln1w=s(C), ln1b=s(C), attnw=s(C, 3 * C), attnb=s(3 * C), projw=s(C, C),
                 projb=s(C), ln2w=s(C), ln2b=s(C), fcw=s(C, 4 * C), fcb=s(4 * C),
                 mprojw=s(4 * C, C), mprojb=s(C))
    params = dict(wte=s(V, C), wpe=s(T, C), lnfw=s(C), lnfb=s(C), h=[layer] * L)
    tokens = s(B, T, dtype=jnp.int32)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older JAX
    return cost["flops"] / (B * T)


@pytest.mark.slow
def test_formula_against_xla_cost_analysis():
    """What XLA counts: 2·M·N·K per dot, so every matmul of the forward and both matmuls of its
    backward (6 FLOPs per weight per token, the LM head included, the embedding gather not);
    attention as computed, i.e. the full T×T scores before the mask (12·L·T·C, the PaLM term);
    plus 1 FLOP per element-wise op (LayerNorm, GELU, softmax, bias adds, residuals), which the
    formula leaves out. So on a matmul-dominated model (C=256, V=1024, T=64, element-wise work
    ~2 %) XLA ≈ palm, slightly above it; and the attention term, isolated by changing T alone,
    grows like palm's 12·L·C per extra position, twice the causal (tandem) convention's."""
    L, C, NH, V, B = 2, 256, 4, 1024, 2
    xla = {T: _xla_flops_per_token(L, C, NH, V, T, B) for T in (64, 128)}
    palm = {T: flops_per_token(L, C, V, 128, T, convention="palm") for T in (64, 128)}
    tandem = {T: flops_per_token(L, C, V, 128, T) for T in (64, 128)}
    assert xla[64] == pytest.approx(palm[64], rel=0.03)
    assert xla[64] > palm[64]  # element-wise work only adds
    assert tandem[64] < palm[64]
    d_xla, d_palm = xla[128] - xla[64], palm[128] - palm[64]
    assert d_palm == 12 * L * C * 64
    assert d_xla == pytest.approx(d_palm, rel=0.05)  # softmax element-wise work: ~1 % more
    assert tandem[128] - tandem[64] == d_palm / 2


# ---- Llama family ------------------------------------------------------------------------------

LLAMA2_7B = dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=32, vocab_size=32000,
                 ffn_dim=11008)
LLAMA3_8B = dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, vocab_size=128256,
                 ffn_dim=14336)


def test_llama_param_counts_match_the_public_checkpoints():
    from harness.flops import llama_param_count

    # the public safetensors files: Llama-2-7b 6,738,415,616 and Llama-3-8B 8,030,261,248
    # parameters (untied embed_tokens and lm_head both counted)
    assert llama_param_count(**LLAMA2_7B) == 6_738_415_616
    assert llama_param_count(**LLAMA3_8B) == 8_030_261_248
    assert llama_param_count(**LLAMA3_8B, include_embedding=False) == \
        8_030_261_248 - 128256 * 4096


def test_llama_flops_per_token_hand_count():
    """Every matmul of a tiny Llama written out: 2 FLOPs per multiply-add forward, 3x for the
    training step; RMSNorm weights as parameters (6 each per token), attention causal."""
    from harness.flops import llama_flops_per_token

    L, C, NH, NKV, V, F, T = 3, 64, 8, 2, 100, 176, 32
    HS = C // NH
    fwd_matmuls = (C * C          # q_proj
                   + C * NKV * HS  # k_proj
                   + C * NKV * HS  # v_proj
                   + C * C          # o_proj
                   + C * F + C * F  # gate_proj, up_proj
                   + F * C)         # down_proj
    per_token_fwd = L * 2 * fwd_matmuls + 2 * C * V  # + lm_head; embed_tokens is a lookup
    norms = 2 * C * L + C  # input_layernorm, post_attention_layernorm, model.norm
    attn_fwd_full = L * (2 * T * C + 2 * T * C)  # q·k over T keys, p·v over T values
    tandem = 3 * per_token_fwd + 6 * norms + 3 * attn_fwd_full // 2
    palm = 3 * per_token_fwd + 6 * norms + 3 * attn_fwd_full
    assert llama_flops_per_token(L, C, NH, NKV, V, F, T) == tandem == 870_528
    assert llama_flops_per_token(L, C, NH, NKV, V, F, T, convention="palm") == palm
    # GQA saves only projections: against MHA (NKV = NH) the difference is k and v's weights
    mha = llama_flops_per_token(L, C, NH, NH, V, F, T)
    assert mha - tandem == 6 * L * 2 * C * (C - NKV * HS)
    with pytest.raises(ValueError, match="n_kv_head must divide n_head"):
        llama_flops_per_token(L, C, NH, 3, V, F, T)
    with pytest.raises(ValueError, match="convention = 'x'"):
        llama_flops_per_token(L, C, NH, NKV, V, F, T, convention="x")


def test_llama_flops_for_case_dispatches_on_family():
    import types

    from harness.flops import llama_flops_per_token

    m = types.SimpleNamespace(family="llama", n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                              vocab_size=50, ffn_dim=96, n_positions=16)
    case = types.SimpleNamespace(model=m, seq_len=16)
    assert flops_for_case(case) == llama_flops_per_token(2, 64, 4, 2, 50, 96, 16)
    assert flops_for_case(case, "palm") == llama_flops_per_token(2, 64, 4, 2, 50, 96, 16, "palm")
    with pytest.raises(ValueError, match="seq_len = 32 exceeds n_positions = 16"):
        flops_for_case(types.SimpleNamespace(model=m, seq_len=32))


@pytest.mark.slow
def test_llama_formula_against_xla_cost_analysis():
    """XLA's count of reference.llama's training step: ≈ palm (it computes full T×T scores per
    query head, and adds element-wise work), and the attention term grows like 12·L·C per
    extra position whatever n_kv_head is."""
    import jax
    import jax.numpy as jnp

    from harness.flops import llama_flops_per_token
    from reference import llama

    def xla(cfg, T, B=2):
        shapes = {k: jax.ShapeDtypeStruct(s, jnp.float32)
                  for k, s in llama.param_shapes(cfg).items()}
        tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
        fn = jax.jit(lambda p, x, y: llama.loss_and_grads(p, x, y, cfg))
        cost = fn.lower(shapes, tok, tok).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cost["flops"] / (B * T)

    cfg = llama.LlamaConfig(2, 256, 8, 2, 1024, 688, 128)
    args = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.ffn_dim)
    got = {T: xla(cfg, T) for T in (64, 128)}
    palm = {T: llama_flops_per_token(*args, T, convention="palm") for T in (64, 128)}
    assert got[64] == pytest.approx(palm[64], rel=0.03)
    assert got[64] > palm[64]
    assert got[128] - got[64] == pytest.approx(palm[128] - palm[64], rel=0.05)
