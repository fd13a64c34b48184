"""The GEMM's AVX-512 shapes (12x32, and 8x48 where it pads less) sum each element of C over k in
the same order: a few training steps give the same bits whichever the engine takes (on a CPU
without AVX-512 every setting falls back to the same kernel, and the check still holds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import hashlib, json, numpy as np
from harness.engine import Model
from harness.init import init_params
cfg = dict(n_layer=2, n_embd=96, n_head=4, vocab_size=200, n_positions=32, seq_len=32,
           batch_size=8, threads=2)
m = Model(**cfg)
m.set_params(init_params(m.table, 2, 3))
rng = np.random.default_rng(0)
for _ in range(3):
    x = rng.integers(0, 200, (8, 32), dtype=np.int32)
    m.train_step(x, np.roll(x, -1, axis=1))
h = hashlib.sha256()
for name, p in sorted(m.params().items()):
    h.update(name.encode()); h.update(np.ascontiguousarray(p).tobytes())
print(json.dumps(h.hexdigest()))
"""


def _digest(kernel: str) -> str:
    env = dict(os.environ, TANDEM_GEMM_KERNEL=kernel)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and "cannot find libtandem" in r.stderr:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_gemm_kernel_shapes_give_the_same_training_bits():
    default = _digest("default")
    assert _digest("avx512") == default
    assert _digest("avx512-8x48") == default
