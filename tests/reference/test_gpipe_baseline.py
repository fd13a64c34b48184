"""Tests for reference/pipeline.py: the JAX GPipe baseline must give the single-device loss,
gradients and AdamW step. Runs in a subprocess with 4 host CPU devices, because
XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reference import AdamWConfig, GPTConfig
from reference.pipeline import make_gpipe_train_step

REPO = Path(__file__).resolve().parents[2]

_GPIPE_SCRIPT = """
import jax
jax.config.update("jax_numpy_rank_promotion", "raise")
import jax.numpy as jnp, numpy as np
from reference import (AdamWConfig, GPTConfig, accumulated_loss_and_grads, adamw_init,
                       adamw_update, make_gpipe_train_step, param_shapes, set_precision)
set_precision()
assert len(jax.devices()) == 4
cfg = GPTConfig(n_layer=4, n_embd=24, n_head=3, vocab_size=37, n_positions=8)
rng = np.random.default_rng(0)
params = {k: jnp.asarray((1.0 if k.endswith("weight") and len(s) == 1 else 0.0)
                         + rng.normal(0, 0.05, s), jnp.float32)
          for k, s in param_shapes(cfg).items()}
M = 4
toks = jnp.asarray(rng.integers(0, 37, (M, 2, 8)), jnp.int32)
tgts = jnp.asarray(rng.integers(0, 37, (M, 2, 8)), jnp.int32)
loss0, grads0 = jax.jit(accumulated_loss_and_grads, static_argnums=3)(params, toks, tgts, cfg)
# lr=1, eps=1, no decay: the first step is theta - g/(1 + |g|) ~ theta - g, so the parameters
# after one step expose the gradients themselves (with the default eps=1e-8 the first Adam step
# is ~lr*sign(g), blind to gradient errors and turning round-off in gradients that are zero in
# exact arithmetic, like c_attn's key bias, into +-lr).
opt = AdamWConfig(lr=1.0, eps=1.0, weight_decay=0.0, grad_clip=0.0)
ref = jax.jit(adamw_update, static_argnums=3)(params, grads0, adamw_init(params), opt)
for P in (2, 4):
    out = make_gpipe_train_step(cfg, opt, P, M)(params, adamw_init(params),
                                                 toks.reshape(M * 2, 8), tgts.reshape(M * 2, 8))
    assert set(out[0]) == set(params) and int(out[1].step) == 1
    assert abs(float(out[2]) - float(loss0)) < 1e-6 * float(loss0), (P, out[2], loss0)
    assert abs(float(out[3]) - float(ref[2])) < 1e-5 * float(ref[2]), (P, out[3], ref[2])
    for k in params:
        d, d0 = out[0][k] - params[k], ref[0][k] - params[k]
        err = float(jnp.linalg.norm(d - d0) / jnp.linalg.norm(d0))
        assert err < 1e-4, (P, k, err)
print("GPIPE_OK")
"""


# The same for the Llama family (untied head, GQA with 2 query heads per kv head): every tensor
# after one step, the embedding (first stage) and the head (last stage) included.
_LLAMA_GPIPE_SCRIPT = (_GPIPE_SCRIPT
    .replace("from reference import (AdamWConfig, GPTConfig, accumulated_loss_and_grads, "
             "adamw_init,\n                       adamw_update, make_gpipe_train_step, "
             "param_shapes, set_precision)",
             "from reference import AdamWConfig, adamw_init, adamw_update, "
             "make_gpipe_train_step, set_precision\n"
             "from reference.llama import LlamaConfig, accumulated_loss_and_grads, param_shapes")
    .replace("cfg = GPTConfig(n_layer=4, n_embd=24, n_head=3, vocab_size=37, n_positions=8)",
             "cfg = LlamaConfig(n_layer=4, n_embd=24, n_head=4, n_kv_head=2, vocab_size=37, "
             "ffn_dim=40, n_positions=8)"))


@pytest.mark.parametrize("script", [_GPIPE_SCRIPT, _LLAMA_GPIPE_SCRIPT], ids=["gpt2", "llama"])
def test_gpipe_matches_single_device(script):
    assert "GPTConfig(" not in script or script is _GPIPE_SCRIPT  # the llama edit took
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "GPIPE_OK" in proc.stdout, proc.stdout + proc.stderr


def test_gpipe_rejects_bad_stage_counts():
    cfg = GPTConfig(n_layer=3, n_embd=24, n_head=3, vocab_size=37, n_positions=8)
    with pytest.raises(ValueError, match="n_layer=3 is not divisible by stages=2"):
        make_gpipe_train_step(cfg, AdamWConfig(), stages=2, microbatches=2)
    with pytest.raises(ValueError, match="needs 3 devices.*xla_force_host_platform_device_count"):
        make_gpipe_train_step(cfg, AdamWConfig(), stages=3, microbatches=2, devices=[])
