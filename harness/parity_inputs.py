"""What both sides of `tandem parity` start from: one seeded weights file and one pair of token
shards per case, each read back by its own side's reader, and the model configs of each side.
Not here: any comparison (harness/parity_tiers.py) or the command (harness/parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.config import CaseConfig, engine_model_keys
from harness.data import make_case_data, read_shard, write_shard
from harness.engine import Model, read_tokens
from harness.init import init_params, read_safetensors, write_safetensors


@dataclass
class CaseInputs:
    """What both sides start from: one weights file, one pair of token shards, read back by each
    side's own reader (the engine's td_tokens_read, harness.data.read_shard for JAX)."""

    case: CaseConfig
    workdir: Path
    weights: Path
    table: list  # the engine's ParamInfo rows (whole model, one stage)
    inputs_SBT: np.ndarray  # engine side
    targets_SBT: np.ndarray
    jax_inputs_SBT: np.ndarray  # JAX side
    jax_targets_SBT: np.ndarray


def engine_config(case: CaseConfig, threads: int, *, optimizer: bool = True) -> dict:
    """Model(**config) keys for the one-stage engine running `case` (batch_size: the whole batch,
    so that the same model runs full batches and micro-batches)."""
    m, o = case.model, case.optim
    cfg = dict(**engine_model_keys(m), seq_len=case.seq_len, batch_size=case.batch_size,
               threads=threads, backend=case.backend, dtype=case.dtype)
    if optimizer:
        cfg.update(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                   weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    return cfg


def prepare(case: CaseConfig, workdir: Path, threads: int) -> CaseInputs:
    workdir.mkdir(parents=True, exist_ok=True)
    with Model(**engine_config(case, threads)) as m:
        table = list(m.table)
    params = init_params([(p.name, p.shape) for p in table], case.model.n_layer, case.seed)
    weights = workdir / "weights.safetensors"
    write_safetensors(weights, params, metadata={"case": case.name, "seed": str(case.seed)})
    x, y = make_case_data(case)
    V = case.model.vocab_size
    shards = {"inputs": write_shard(workdir / "tokens_inputs.bin", x, V),
              "targets": write_shard(workdir / "tokens_targets.bin", y, V)}
    eng = {k: read_tokens(p, V).reshape(x.shape) for k, p in shards.items()}
    jx = {k: read_shard(p, V).reshape(x.shape) for k, p in shards.items()}
    return CaseInputs(case, workdir, weights, table, eng["inputs"], eng["targets"],
                      jx["inputs"], jx["targets"])


def prepare_ops_only(case: CaseConfig, workdir: Path) -> CaseInputs:
    """The inputs of a Llama case that runs the op tier alone: its kernels draw their own
    inputs, so no weights and no tokens."""
    workdir.mkdir(parents=True, exist_ok=True)
    none = np.zeros((0, 0, 0), np.int32)
    return CaseInputs(case, workdir, workdir / "no-weights", [], none, none, none, none)


def _load_engine(inp: CaseInputs, threads: int) -> Model:
    m = Model(**engine_config(inp.case, threads))
    m.load_safetensors(inp.weights)
    return m


def _jax_params(inp: CaseInputs) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in read_safetensors(inp.weights).items()}


def _ref_config(case: CaseConfig):
    """The reference's config of the case's model: a GPTConfig or a llama.LlamaConfig."""
    m = case.model
    if m.family == "llama":
        from reference.llama import LlamaConfig

        return LlamaConfig(m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.vocab_size, m.ffn_dim,
                           m.n_positions, m.rope_theta, m.norm_eps)
    from reference import GPTConfig

    return GPTConfig(m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.n_positions)


def _ref_model(case: CaseConfig):
    """The reference module of the case's family (forward, loss_and_grads, param_shapes)."""
    if case.model.family == "llama":
        from reference import llama

        return llama
    from reference import gpt2

    return gpt2
