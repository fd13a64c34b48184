"""harness/envinfo.py: environment description, datasheet matching, measured peaks, CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from harness import envinfo
from harness.errors import ConfigError

KEYS = {"hostname", "timestamp", "platform", "cpu_model", "cpu_count", "memory_bytes", "gpus",
        "gpu_name", "gpu_driver", "python", "numpy", "jax", "jaxlib", "gcc", "engine", "commit",
        "commit_dirty", "env_vars"}


def test_collect_env_keys():
    env = envinfo.collect_env()
    assert KEYS <= set(env)
    assert env["cpu_count"] >= 1 and env["cpu_model"]
    assert env["python"].count(".") == 2
    assert env["timestamp"].endswith("+00:00")
    assert isinstance(env["gpus"], list)
    assert env["engine"] == "unavailable" or isinstance(env["engine"], str)
    json.dumps(env)  # goes into run.json as is


def test_datasheet_matching():
    assert envinfo.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == (989e12,
                                                                       "datasheet H100 SXM bf16")
    assert envinfo.datasheet_peak("NVIDIA H200", "fp32") == (67e12, "datasheet H200 SXM fp32")
    assert envinfo.datasheet_peak("NVIDIA H200", "tf32")[0] == 495e12
    assert envinfo.datasheet_peak("NVIDIA H100 PCIe", "bf16") is None  # lower-clocked part
    assert envinfo.datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") is None
    assert envinfo.datasheet_peak(None, "bf16") is None


def test_measure_cpu_gemm_peak_small():
    r = envinfo.measure_cpu_gemm_peak(n=64, repeats=2)
    assert r["flops_per_s"] > 0 and r["n"] == 64 and r["seconds"] > 0
    assert r["source"] == "measured fp32 GEMM (numpy)"
    assert "openblas_coretype" in r
    with pytest.raises(ConfigError):
        envinfo.measure_cpu_gemm_peak(n=0)


def test_peak_for():
    env = {"gpu_name": "NVIDIA H100 80GB HBM3"}
    assert envinfo.peak_for("cuda", "bf16", env) == (989e12, "datasheet H100 SXM bf16")
    cached = {"cpu_gemm_peak": {"flops_per_s": 1.5e11, "source": "measured fp32 GEMM (numpy)"}}
    assert envinfo.peak_for("cpu", "fp32", cached) == (1.5e11, "measured fp32 GEMM (numpy)")
    f, src = envinfo.peak_for("cpu", "fp32", {}, measure=False)
    assert math.isnan(f) and src == "unavailable"
    f, src = envinfo.peak_for("cuda", "bf16", {"gpu_name": None}, measure=False)
    assert math.isnan(f) and src == "unavailable"
    with pytest.raises(ConfigError, match="backend = 'tpu'"):
        envinfo.peak_for("tpu", "fp32", {})
    with pytest.raises(ConfigError, match="dtype = 'bf16'"):
        envinfo.peak_for("cpu", "bf16", {})


def test_measure_gpu_peak_without_gpu():
    if envinfo.collect_env()["gpus"]:
        pytest.skip("a GPU is present")
    assert envinfo.measure_gpu_peak(n=64, repeats=1) == {}


def test_cli_env_and_peak(capsys):
    p = argparse.ArgumentParser()
    envinfo.add_parser_env(p)
    assert envinfo.run_env(p.parse_args(["--json"])) == 0
    assert KEYS <= set(json.loads(capsys.readouterr().out))
    assert envinfo.run_env(p.parse_args([])) == 0
    assert "cpu_model" in capsys.readouterr().out

    p = argparse.ArgumentParser()
    envinfo.add_parser_peak(p)
    assert envinfo.run_peak(p.parse_args(["--json", "--size", "64", "--repeats", "1"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpu"]["n"] == 64 and out["cpu"]["flops_per_s"] > 0
    assert envinfo.run_peak(p.parse_args(["--size", "64", "--repeats", "1"])) == 0
    assert "GFLOP/s" in capsys.readouterr().out
