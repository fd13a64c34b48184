"""The CUDA backend's device state held to the CPU engine: the tiers of tests/engine/test_cuda.py
that are about what the GPU keeps between calls rather than one pass's numbers.

Tiers (docs/cuda.md has the measured numbers):
  lazy zero_grad - zero_grad writes nothing; the next backward overwrites each gradient (wpe's
          rows past a shorter T included): the same gradients as the CPU after stale ones.
  tuned products - TANDEM_CUDA_GEMM_TUNE=all (every product takes its fastest measured
          algorithm): fp32 parity as in test_cuda.py, and two models of one process give the
          same bits.
  checkpoints - parameters, AdamW state and the step leave the GPU and come back exactly; CPU
          and GPU checkpoints are interchangeable; find_nonfinite reads the device.
  host-stage refusal - a CUDA model's stage passes take device buffers only.
Cases, tolerances and helpers come from test_cuda.py; its script mode (`python
tests/engine/test_cuda.py --json OUT.json`) runs the checks here too. Skipped with the reason
when this libtandem was built without CUDA or no GPU is usable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_util, test_cuda as a script
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine_util import rough_params, tokens_for  # noqa: E402
from harness import engine  # noqa: E402
from harness.errors import EngineError  # noqa: E402
from harness.init import init_params  # noqa: E402
from test_cuda import (BF16_CASES, FP32_CASES, FP32_TOL, _cuda_model, _failures,  # noqa: E402
                       _kbias_split, _models, _same_bits, _table, check_fp32,
                       cuda_unavailable_reason, rel_l2)


@pytest.fixture(scope="module")
def cuda_ok(engine_library):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)


class _env:
    """Set environment variables (None: unset) for the duration of a with block."""

    def __init__(self, **values):
        self.values, self.old = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.old[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_lazy_zero_grad(case: str = "hs16") -> list[dict]:
    """zero_grad on the GPU writes nothing (the next backward overwrites): after a backward at
    the full T, zero_grad must read back as zeros, and a backward at a shorter T (wpe rows past it
    get no gradient) then one at the full T (accumulated) must match the CPU engine."""
    config = FP32_CASES[case]
    params = rough_params([engine.ParamInfo(n, s, 0, False) for n, s in _table(config)],
                          config["n_layer"], seed=12)
    cpu, gpu = _models(config, params, "fp32")
    label = f"lazy-zero-grad/{case}"
    rows = []
    try:
        x, y = tokens_for(config, seed=7)
        t = max(1, config["seq_len"] // 2)
        gpu.zero_grad()
        gpu.forward_backward(x, y, 1.0)  # stale gradients everywhere, wpe rows [0, T) included
        gpu.zero_grad()
        rows.append(dict(tier=label, metric="max abs after zero_grad", tensor="all",
                         value=float(max(np.abs(g).max() for g in gpu.grads().values())),
                         bound=0.0))
        for m in (cpu, gpu):
            m.zero_grad()
            m.forward_backward(x[:, :t], y[:, :t], 1.0)
        gc, gg = cpu.grads(), gpu.grads()
        for name in gc:
            a, _ = _kbias_split(name, gg[name], config["n_embd"])
            r, _ = _kbias_split(name, gc[name], config["n_embd"])
            rows.append(dict(tier=label, metric=f"grad rel L2 (T={t})", tensor=name,
                             value=rel_l2(a, r), bound=FP32_TOL["grad"]))
        for m in (cpu, gpu):
            m.forward_backward(x, y, 1.0)  # accumulates
        gc, gg = cpu.grads(), gpu.grads()
        for name in gc:
            a, _ = _kbias_split(name, gg[name], config["n_embd"])
            r, _ = _kbias_split(name, gc[name], config["n_embd"])
            rows.append(dict(tier=label, metric=f"grad rel L2 (T={t} + T={config['seq_len']})",
                             tensor=name, value=rel_l2(a, r), bound=FP32_TOL["grad"]))
    finally:
        cpu.close()
        gpu.close()
    return rows


def check_tuned_gemm() -> list[dict]:
    """Every product on its fastest measured algorithm (TANDEM_CUDA_GEMM_TUNE=all): fp32 parity
    with the CPU, and two bf16 models of this process give the same bits (the choice is kept per
    process)."""
    with _env(TANDEM_CUDA_GEMM_TUNE="all"):
        rows = [dict(r, tier="tuned/" + r["tier"]) for r in check_fp32("hs24")]
        config = BF16_CASES["c768"]
        params = init_params(_table(config), config["n_layer"], seed=4)
        x, y = tokens_for(config, seed=6)
        runs = []
        for _ in range(2):
            with engine.Model(backend="cuda", dtype="bf16", **config) as m:
                m.set_params(params)
                m.zero_grad()
                loss = m.forward_backward(x, y, 1.0)
                runs.append((loss, m.grads()))
    same = _same_bits(runs)
    rows.append(dict(tier="tuned/determinism/bf16/c768", metric="bit-identical (two models)",
                     tensor="loss+grads", value=float(same), bound=None))
    return rows



# ---- pytest ------------------------------------------------------------------------------------

def test_host_stage_passes_are_refused_on_cuda(cuda_ok):
    """A CUDA model's stage passes take device buffers (td_stage_*_dev, driven by tandem-engine's
    ranks: tests/harness/test_pipeline_gpu.py); the host-array entry points say so."""
    config = FP32_CASES["t1"]
    with engine.Model(backend="cuda", dtype="fp32", **config) as m:
        x, y = tokens_for(config, seed=1)
        with pytest.raises(EngineError, match="take device buffers.*td_stage_forward_dev"):
            m.stage_forward(0, tokens=x, targets=y)


def test_lazy_zero_grad(cuda_ok):
    bad = _failures(check_lazy_zero_grad())
    assert not bad, bad


def test_tuned_products(cuda_ok):
    rows = check_tuned_gemm()
    assert not _failures(rows), _failures(rows)
    assert rows[-1]["value"] == 1.0, rows[-1]


def test_bad_gemm_tune_mode_is_a_config_error(cuda_ok, monkeypatch):
    monkeypatch.setenv("TANDEM_CUDA_GEMM_TUNE", "fastest")
    with pytest.raises(EngineError, match="TANDEM_CUDA_GEMM_TUNE=fastest .allowed: auto, off, all"):
        engine.Model(backend="cuda", dtype="fp32", **FP32_CASES["t1"])



# ---- checkpoints: device state to a file and back ------------------------------------------------


def _ckpt_steps(model, x, y, steps):
    losses = []
    for s in steps:
        model.zero_grad()
        losses.append(model.forward_backward(x[s], y[s]))
        model.optimizer_step()
    return losses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_checkpoint_resume_is_bit_identical(cuda_ok, tmp_path, dtype):
    """Parameters, AdamW m and v and the step leave the GPU and come back exactly: 3 steps, a
    checkpoint, 3 more steps in a fresh model equal 6 uninterrupted steps bit for bit."""
    config = FP32_CASES["hs16"]
    params = init_params(_table(config), config["n_layer"], seed=3)
    rng = np.random.default_rng(5)
    x = rng.integers(0, config["vocab_size"], (6, config["batch_size"], config["seq_len"]))
    y = rng.integers(0, config["vocab_size"], (6, config["batch_size"], config["seq_len"]))
    whole = _cuda_model(config, dtype)
    whole.set_params(params)
    want = _ckpt_steps(whole, x, y, range(6))
    first = _cuda_model(config, dtype)
    first.set_params(params)
    got = _ckpt_steps(first, x, y, range(3))
    first.save_checkpoint(tmp_path / "c.safetensors", 3)
    resumed = _cuda_model(config, dtype)
    assert resumed.load_checkpoint(tmp_path / "c.safetensors") == 3
    got += _ckpt_steps(resumed, x, y, range(3, 6))
    assert got == want
    for name, w in whole.params().items():
        assert np.array_equal(resumed.get_param(name), w), name


def test_cuda_and_cpu_checkpoints_are_interchangeable(cuda_ok, tmp_path):
    """A checkpoint written by the CPU engine loads on the GPU and is written back unchanged:
    the format holds the fp32 state whatever the backend."""
    from harness.init import read_safetensors

    config = FP32_CASES["hs16"]
    params = init_params(_table(config), config["n_layer"], seed=3)
    rng = np.random.default_rng(6)
    x = rng.integers(0, config["vocab_size"], (2, config["batch_size"], config["seq_len"]))
    cpu = engine.Model(**config)
    cpu.set_params(params)
    _ckpt_steps(cpu, x, x, range(2))
    cpu.save_checkpoint(tmp_path / "cpu.safetensors", 2)
    gpu = _cuda_model(config, "fp32")
    assert gpu.load_checkpoint(tmp_path / "cpu.safetensors") == 2
    gpu.save_checkpoint(tmp_path / "gpu.safetensors", 2)
    a = read_safetensors(tmp_path / "cpu.safetensors")
    b = read_safetensors(tmp_path / "gpu.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_cuda_find_nonfinite_reads_the_device(cuda_ok):
    config = FP32_CASES["hs16"]
    gpu = _cuda_model(config, "fp32")
    gpu.set_params(init_params(_table(config), config["n_layer"], seed=3))
    assert gpu.find_nonfinite() is None
    w = gpu.get_param("h.1.mlp.c_fc.weight")
    w[0, 0] = np.nan
    gpu.set_param("h.1.mlp.c_fc.weight", w)
    assert gpu.find_nonfinite() == ("parameter", "h.1.mlp.c_fc.weight")
