"""tandem-engine ranks with CUDA stages: schedule invariance against the one-stage CUDA engine
(ranks sharing one GPU, or one GPU each where there are enough), and the failure promises of the
CPU runtime (a rank that dies brings the job down within seconds, naming the rank). Every test
but the first skips without a GPU and a CUDA build; the first checks the error a CPU-only
tandem-engine gives for a GPU job."""

from __future__ import annotations

import dataclasses
import shutil
import time

import numpy as np
import pytest

from harness.config import load_suite
from harness.errors import RankFailure

pipeline = pytest.importorskip("harness.pipeline")
parity = pytest.importorskip("harness.parity")
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(pipeline.unavailable() is not None,
                                                  reason=str(pipeline.unavailable()))]


def _cuda_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi: no NVIDIA GPU on this machine"
    from harness.engine import EngineError, Model

    try:
        Model(n_layer=1, n_embd=8, n_head=1, vocab_size=8, n_positions=2, seq_len=2,
              batch_size=1, backend="cuda").close()
    except EngineError as exc:
        return f"the CUDA backend cannot run here: {exc}"
    return None


def _case(schedule="1f1b", stages=2, microbatches=2, chunks=1, n_layer=4, dtype="fp32",
          steps=3):
    base = load_suite("smoke").case("tiny-1f1b-p2m2")
    model = dataclasses.replace(base.model, n_layer=n_layer)
    pipe = dataclasses.replace(base.pipeline, schedule=schedule, stages=stages,
                               microbatches=microbatches, chunks=chunks)
    return dataclasses.replace(base, name=f"{schedule}-p{stages}m{microbatches}v{chunks}",
                               model=model, pipeline=pipe, batch_size=8, backend="cuda",
                               dtype=dtype, steps=steps)


def _inputs(case, tmp_path):
    """Weights and tokens on disk (the same for any backend); inp.case is `case`, whose backend
    the control (parity._engine_run) runs on."""
    return parity.prepare(case, tmp_path / "inputs", threads=1)


def test_cpu_only_engine_refuses_a_gpu_job_clearly(tmp_path):
    if _cuda_reason() is None:
        pytest.skip("this tandem-engine has CUDA: the refusal cannot be seen here")
    case = _case()
    inp = _inputs(dataclasses.replace(case, backend="cpu"), tmp_path)  # same weights, tokens
    with pytest.raises(RankFailure, match=r"rank \d failed: .*backend=cuda but this "
                                          r"tandem-engine was built without CUDA"):
        pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                              tmp_path / "run", timeout=60)


@pytest.fixture(scope="module")
def gpu():
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("layout", [("1f1b", 2, 2, 1), ("gpipe", 2, 4, 1), ("zb-h1", 4, 8, 1),
                                    ("interleaved", 2, 4, 2)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_pipeline_matches_one_stage_cuda_engine(gpu, tmp_path, layout, dtype):
    """Each step's loss and gradient norm, and the final parameters, against the one-stage CUDA
    engine with the same micro-batches, at the schedule tier's gates."""
    from harness import tolerances as tol

    schedule, P, M, V = layout
    case = _case(schedule, P, M, V, dtype=dtype)
    inp = _inputs(case, tmp_path)
    ctrl = parity._engine_run(inp, 1, M)
    res = pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                                tmp_path / "run", timeout=120)
    assert res.transport in ("cuda-ipc", "nccl"), res.ranks
    loss_tol = tol.tolerance(dtype, "schedule", "loss").value
    param_tol = tol.tolerance(dtype, "schedule", "param").value
    np.testing.assert_allclose(res.losses, ctrl.losses, rtol=loss_tol)
    np.testing.assert_allclose(res.grad_norms, ctrl.norms, rtol=loss_tol)
    assert sorted(res.params) == sorted(ctrl.params)
    for name, want in ctrl.params.items():
        rel = np.linalg.norm(res.params[name] - want) / max(np.linalg.norm(want), 1e-30)
        assert rel < param_tol or np.abs(res.params[name] - want).max() < 1e-6, (name, rel)
    assert all(r["backend"] == "cuda" and r["device_bytes"] > 0 for r in res.ranks), res.ranks
    assert len(list(res.timeline_dir.glob("timeline_rank*.csv"))) == P


def test_killed_cuda_rank_brings_job_down(gpu, tmp_path):
    case = _case(steps=6)
    inp = _inputs(case, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 (died|exited).*(SIGKILL|signal 9|137)"):
        pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                              tmp_path / "run", timeout=120,
                              extra_env={"TANDEM_CRASH": "1:2:kill"})
    assert time.monotonic() - t0 < 30


def test_cuda_rank_exit_names_the_rank(gpu, tmp_path):
    case = _case(steps=6)
    inp = _inputs(case, tmp_path)
    with pytest.raises(RankFailure, match=r"rank 0 failed: TANDEM_CRASH requested.*step 1"):
        pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                              tmp_path / "run", timeout=120, extra_env={"TANDEM_CRASH": "0:1"})


def test_bad_transport_is_a_clear_error(gpu, tmp_path):
    case = _case()
    inp = _inputs(case, tmp_path)
    with pytest.raises(RankFailure, match=r"TANDEM_TRANSPORT=carrier-pigeon \(allowed: auto, "
                                          r"nccl, ipc\)"):
        pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                              tmp_path / "run", timeout=60,
                              extra_env={"TANDEM_TRANSPORT": "carrier-pigeon"})


def test_nccl_on_a_shared_gpu_is_refused(gpu, tmp_path):
    import subprocess

    n = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.count("GPU ")
    if n >= 2:
        pytest.skip(f"{n} GPUs: two ranks get a GPU each")
    case = _case()
    inp = _inputs(case, tmp_path)
    with pytest.raises(RankFailure, match=r"TANDEM_TRANSPORT=nccl needs one GPU per rank"):
        pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                              tmp_path / "run", timeout=60, extra_env={"TANDEM_TRANSPORT": "nccl"})


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_pipeline_resume_after_a_crash_is_bit_identical(gpu, tmp_path, dtype):
    """CUDA ranks checkpoint every 2 steps; a rank dies at step 5; resuming at step 4 gives the
    uninterrupted run's losses and final parameters bit for bit."""
    case = _case(steps=6, dtype=dtype)
    inp = _inputs(case, tmp_path)
    whole = pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                                  tmp_path / "whole", timeout=120)
    ck = tmp_path / "ck"
    with pytest.raises(RankFailure, match=r"TANDEM_CRASH requested.*step 5"):
        pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                              tmp_path / "a", timeout=120, checkpoint_dir=ck,
                              checkpoint_every=2, extra_env={"TANDEM_CRASH": "1:5"})
    res = pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                                tmp_path / "b", timeout=120, checkpoint_dir=ck,
                                checkpoint_every=2, resume_step=4)
    assert list(res.steps) == [4, 5]
    assert np.array_equal(res.losses, whole.losses[4:])
    assert sorted(res.params) == sorted(whole.params)
    for name, want in whole.params.items():
        assert np.array_equal(res.params[name], want), name


def test_gpu_pipeline_skip_mode_counts(gpu, tmp_path):
    case = _case(steps=4)
    case = dataclasses.replace(case, optim=dataclasses.replace(case.optim, lr=1e5, grad_clip=0.0))
    inp = _inputs(case, tmp_path)
    res = pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                                tmp_path / "run", timeout=120, on_nonfinite="skip")
    assert res.skipped is not None and res.skipped.any()
    assert all(np.isfinite(v).all() for v in res.params.values())


def test_ranks_sharing_a_gpu_under_mps_compute_what_time_sliced_ranks_do(gpu, tmp_path):
    """harness.mps: the ranks of a 4-stage job on one GPU run under a private MPS daemon (mps on)
    or time-sliced (mps off); the same kernels in the same order, so the same bits."""
    from harness import mps

    if mps.visible_gpus() >= 4:
        pytest.skip("4 GPUs: each rank has its own")
    if shutil.which(mps.CONTROL) is None:
        pytest.skip(f"{mps.CONTROL} is not on PATH")
    case = _case("zb-h1", 4, 8)
    inp = _inputs(case, tmp_path)
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                                           tmp_path / mode, timeout=120, mps=mode)
    assert runs["off"].mps == "off" and runs["on"].mps == "private"
    np.testing.assert_array_equal(runs["on"].losses, runs["off"].losses)
    for name, want in runs["off"].params.items():
        np.testing.assert_array_equal(runs["on"].params[name], want, err_msg=name)
