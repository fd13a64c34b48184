"""tools/cuda_profile.py: the CUDA phase profile of a suite's case. Its GPU run is exercised on a
GPU host (results/gpu-llama); here: the bad-input paths, which must name what is wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import cuda_profile  # noqa: E402


def test_refuses_a_cpu_case_naming_its_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        cuda_profile.main(["--suite", "smoke", "--case", "tiny"])
    assert exc.value.code == 2
    assert "case tiny runs on backend 'cpu': this profiles CUDA cases" in capsys.readouterr().err


def test_refuses_an_unknown_case_listing_the_suites(capsys):
    with pytest.raises(SystemExit) as exc:
        cuda_profile.main(["--suite", "llama-gpu", "--case", "llama-70b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no case 'llama-70b' in suite llama-gpu" in err and "llama-1b" in err


def test_random_params_are_finite_at_the_init_scale():
    from harness.engine import Model

    with Model(family="llama", n_layer=1, n_embd=16, n_head=4, n_kv_head=2, vocab_size=11,
               n_positions=8, ffn_dim=24, seq_len=4, batch_size=1) as m:
        params = cuda_profile.random_params(m.table, 1)
    assert set(params) == {p.name for p in m.table}
    assert params["model.layers.0.input_layernorm.weight"].min() == 1.0
    w = params["model.layers.0.self_attn.q_proj.weight"]
    assert w.shape == (16, 16) and 0.005 < w.std() < 0.05
