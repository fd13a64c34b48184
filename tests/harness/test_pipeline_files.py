"""What harness.pipeline writes for the ranks and reads back from them, without launching any:
the run file's backend/bf16 keys, rank<r>.json descriptions (present, absent, broken), the
environment GPU jobs get."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harness import pipeline
from harness.config import load_suite
from harness.errors import DataError


def _runfile(tmp_path, case) -> dict[str, str]:
    path = tmp_path / "run.txt"
    pipeline.write_runfile(path, case, {"weights": tmp_path / "w.safetensors"}, steps=3,
                           threads=1, save_grads_step=0)
    return dict(line.split(" ", 1) for line in path.read_text().splitlines())


def test_runfile_names_backend_and_bf16(tmp_path):
    cpu = load_suite("smoke").case("tiny-1f1b-p2m2")
    keys = _runfile(tmp_path, cpu)
    assert keys["backend"] == "0" and keys["bf16"] == "0"
    # the CPU run file is otherwise unchanged: the keys the engine read before are all there
    for k in ("n_layer", "batch_size", "microbatches", "chunks", "steps", "layers", "lr",
              "weights"):
        assert k in keys
    assert keys["layers"] == "1,1"
    gpu32 = dataclasses.replace(cpu, backend="cuda")
    assert (_runfile(tmp_path, gpu32)["backend"], _runfile(tmp_path, gpu32)["bf16"]) == ("1", "0")
    bf16 = dataclasses.replace(cpu, backend="cuda", dtype="bf16")
    assert (_runfile(tmp_path, bf16)["backend"], _runfile(tmp_path, bf16)["bf16"]) == ("1", "1")


def _rank(r, P=2, **kw):
    info = {"rank": r, "ranks": P, "backend": "cuda", "transport": "cuda-ipc", "device": 0,
            "device_name": "NVIDIA H100 80GB HBM3", "stages": [r], "device_bytes": 1000 + r}
    info.update(kw)
    return info


def test_rank_info_present(tmp_path):
    for r in (1, 0):
        (tmp_path / f"rank{r}.json").write_text(json.dumps(_rank(r)))
    (tmp_path / "rank0.log").write_text("not a description")
    ranks = pipeline.read_rank_info(tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["device_bytes"] for r in ranks] == [1000, 1001]
    res = pipeline.PipelineResult(losses=None, grad_norms=None, step_s=None, grads={},
                                  params={}, out_dir=tmp_path, timeline_dir=tmp_path, wall_s=0.0,
                                  ranks=ranks)
    assert res.transport == "cuda-ipc" and res.devices == 1


def test_rank_info_absent_is_tolerated(tmp_path):
    assert pipeline.read_rank_info(tmp_path) == []
    res = pipeline.PipelineResult(losses=None, grad_norms=None, step_s=None, grads={},
                                  params={}, out_dir=tmp_path, timeline_dir=tmp_path, wall_s=0.0)
    assert res.ranks == [] and res.transport is None and res.devices is None


def test_distinct_devices():
    assert pipeline.distinct_devices([]) is None
    assert pipeline.distinct_devices([_rank(0, backend="cpu", device=-1, transport="mpi")]) == 0
    assert pipeline.distinct_devices([_rank(r, 4) for r in range(4)]) == 1  # one shared GPU
    assert pipeline.distinct_devices([_rank(r, 4, device=r) for r in range(4)]) == 4
    assert pipeline.distinct_devices([_rank(r, 4, device=r % 2) for r in range(4)]) == 2


@pytest.mark.parametrize("text, pattern", [
    ("{not json", r"rank0\.json: cannot read"),
    ("[1, 2]", r"expected a JSON object, got list"),
    (json.dumps({"rank": 0, "ranks": 2}), r"missing key\(s\) \['backend'"),
    (json.dumps(_rank(1)), r"says rank 1, the file name 0"),
])
def test_broken_rank_info_is_named(tmp_path, text, pattern):
    (tmp_path / "rank0.json").write_text(text)
    with pytest.raises(DataError, match=pattern):
        pipeline.read_rank_info(tmp_path)


def test_gpu_jobs_keep_nvlink_multicast_off(monkeypatch):
    if pipeline.unavailable() is not None:  # _mpi_env resolves mpirun's library directory
        pytest.skip(pipeline.unavailable())
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    assert pipeline._mpi_env(1, "cuda")["NCCL_NVLS_ENABLE"] == "0"
    assert "NCCL_NVLS_ENABLE" not in pipeline._mpi_env(1, "cpu")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # setdefault: a caller's explicit choice stands
    assert pipeline._mpi_env(1, "cuda")["NCCL_NVLS_ENABLE"] == "1"
