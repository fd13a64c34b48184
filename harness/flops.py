"""FLOPs per token, achieved FLOP/s and MFU: the one place these are computed.

Training FLOPs per token (forward + backward), in two conventions:
  tandem: 6·N + 6·L·T·C   (attention counted causally: half of the T×T score matrix)
  palm:   6·N + 12·L·T·C  (PaLM paper, appendix B: full attention, for comparison with papers)
N counts every parameter that does a multiply-add per token: all but the embedding lookups.
GPT-2: all parameters except the position embeddings; the tied LM head is counted once, through
wte (its matmul is real work, the embedding lookup is not).
Llama (untied, no biases): all parameters except model.embed_tokens (a lookup); lm_head counts.
Per layer, with HS = C/NH and KV = n_kv_head·HS:
  grouped-query attention: q_proj and o_proj C×C each, k_proj and v_proj C×KV each
  SwiGLU MLP: gate_proj, up_proj and down_proj, three matrices of C×F
  two RMSNorm weights (C each); plus model.norm (C) and lm_head (V×C) once.
The attention term is the same 6·L·T·C (12 for palm) as GPT-2's: scores and the weighted sum
are computed per query head (NH·HS = C), and sharing key/value heads saves projections (N), not
these products. Element-wise work is not counted.
This module does arithmetic only: it measures nothing (peaks come from harness.envinfo).
"""

from __future__ import annotations

from typing import Any

CONVENTIONS = ("tandem", "palm")


def param_count(n_layer: int, n_embd: int, vocab_size: int, n_positions: int,
                include_wpe: bool = True) -> int:
    """Parameters of the GPT-2 table in docs/model.md (tied LM head counted once).
    Per layer: ln_1, ln_2 (2·2C), c_attn (3C² + 3C), attn.c_proj (C² + C), c_fc (4C² + 4C),
    mlp.c_proj (4C² + C) = 12C² + 13C; plus wte (V·C), wpe (n_positions·C), ln_f (2C)."""
    L, C, V = n_layer, n_embd, vocab_size
    n = V * C + L * (12 * C * C + 13 * C) + 2 * C
    return n + (n_positions * C if include_wpe else 0)


def flops_per_token(n_layer: int, n_embd: int, vocab_size: int, n_positions: int, seq_len: int,
                    convention: str = "tandem") -> float:
    """Training FLOPs per token (forward + backward = 3 × forward) at sequence length seq_len.
    6·N: each weight does one multiply-add (2 FLOPs) per token forward and two backward.
    Attention: Q·Kᵀ and P·V are 2·T·C FLOPs each per token and layer forward when all T keys are
    visible (palm: 3 × 4·T·C = 12·L·T·C); causal masking halves the useful work (tandem)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention = {convention!r}: unknown "
                         f"(allowed: {', '.join(CONVENTIONS)})")
    if seq_len > n_positions:
        raise ValueError(f"seq_len = {seq_len} exceeds n_positions = {n_positions}")
    n = param_count(n_layer, n_embd, vocab_size, n_positions, include_wpe=False)
    attn = (6 if convention == "tandem" else 12) * n_layer * seq_len * n_embd
    return float(6 * n + attn)


def llama_param_count(n_layer: int, n_embd: int, n_head: int, n_kv_head: int,
                      vocab_size: int, ffn_dim: int, include_embedding: bool = True) -> int:
    """Parameters of the Llama table in docs/model.md (untied head, no biases).
    Per layer: q_proj and o_proj (2C²), k_proj and v_proj (2·C·KV, KV = n_kv_head·C/n_head),
    gate, up and down (3·C·F), two RMSNorm weights (2C); plus embed_tokens (V·C, when
    include_embedding), model.norm (C) and lm_head (V·C)."""
    L, C, V, F = n_layer, n_embd, vocab_size, ffn_dim
    if n_embd % n_head or n_head % n_kv_head:
        raise ValueError(f"n_embd = {n_embd}, n_head = {n_head}, n_kv_head = {n_kv_head}: "
                         "n_head must divide n_embd and n_kv_head must divide n_head")
    KV = n_kv_head * (C // n_head)
    n = L * (2 * C * C + 2 * C * KV + 3 * C * F + 2 * C) + C + V * C
    return n + (V * C if include_embedding else 0)


def llama_flops_per_token(n_layer: int, n_embd: int, n_head: int, n_kv_head: int,
                          vocab_size: int, ffn_dim: int, seq_len: int,
                          convention: str = "tandem") -> float:
    """Training FLOPs per token of a Llama model: 6·N (N = llama_param_count without the
    embedding lookup) + 6·L·T·C causal attention (12·L·T·C for palm)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention = {convention!r}: unknown "
                         f"(allowed: {', '.join(CONVENTIONS)})")
    n = llama_param_count(n_layer, n_embd, n_head, n_kv_head, vocab_size, ffn_dim,
                          include_embedding=False)
    attn = (6 if convention == "tandem" else 12) * n_layer * seq_len * n_embd
    return float(6 * n + attn)


def flops_for_case(case: Any, convention: str = "tandem") -> float:
    """FLOPs per token for a harness.config.CaseConfig (duck-typed: .model and .seq_len), by
    the model's family (GPT-2 when the model has no `family`)."""
    m = case.model
    if getattr(m, "family", "gpt2") == "llama":
        if case.seq_len > m.n_positions:
            raise ValueError(f"seq_len = {case.seq_len} exceeds n_positions = {m.n_positions}")
        return llama_flops_per_token(m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.vocab_size,
                                     m.ffn_dim, case.seq_len, convention)
    return flops_per_token(m.n_layer, m.n_embd, m.vocab_size, m.n_positions, case.seq_len,
                           convention)


def achieved_flops(flops_per_token: float, tokens_per_s: float) -> float:
    """Model FLOP/s actually delivered: FLOPs per token × tokens per second."""
    return flops_per_token * tokens_per_s


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation, a fraction (0.4 = 40 %): achieved FLOP/s ÷ peak FLOP/s. The
    caller stores `peak_flops` beside the result (records.Record.peak_flops / peak_source)."""
    if not peak_flops > 0:
        raise ValueError(f"peak_flops = {peak_flops!r}: must be > 0")
    return achieved_flops(flops_per_token, tokens_per_s) / peak_flops


__all__ = ["CONVENTIONS", "param_count", "flops_per_token", "llama_param_count",
           "llama_flops_per_token", "flops_for_case", "achieved_flops", "mfu"]
