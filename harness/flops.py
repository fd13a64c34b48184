"""FLOPs per token, achieved FLOP/s and MFU: the one place these are computed.

Training FLOPs per token (forward + backward) for the GPT-2 family, in two conventions:
  tandem: 6·N + 6·L·T·C   (attention counted causally: half of the T×T score matrix)
  palm:   6·N + 12·L·T·C  (PaLM paper, appendix B: full attention, for comparison with papers)
N counts every parameter except the position embeddings; the tied LM head is counted once, through
wte (its matmul is real work, the embedding lookup is not). Element-wise work is not counted.
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


def flops_for_case(case: Any, convention: str = "tandem") -> float:
    """flops_per_token for a harness.config.CaseConfig (duck-typed: .model and .seq_len)."""
    m = case.model
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


__all__ = ["CONVENTIONS", "param_count", "flops_per_token", "flops_for_case", "achieved_flops",
           "mfu"]
