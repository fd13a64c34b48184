"""Pipelined engine runs under mpirun: schedule invariance against the one-stage engine, and
rank failures that end the job promptly with a message naming the rank."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from harness.config import load_suite
from harness.data import make_case_data
from harness.engine import Model
from harness.errors import RankFailure
from harness.init import init_params, write_safetensors

pipeline = pytest.importorskip("harness.pipeline")
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(pipeline.unavailable() is not None,
                                                  reason=str(pipeline.unavailable()))]


def _case(stages=2, microbatches=2, schedule="1f1b", chunks=1, n_layer=2, steps=3):
    base = load_suite("smoke").case("tiny")
    model = dataclasses.replace(base.model, n_layer=n_layer)
    pipe = dataclasses.replace(base.pipeline, stages=stages, microbatches=microbatches,
                               schedule=schedule, chunks=chunks)
    return dataclasses.replace(base, model=model, pipeline=pipe, steps=steps)


def _control(case, weights):
    m, o = case.model, case.optim
    model = Model(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, vocab_size=m.vocab_size,
                  n_positions=m.n_positions, seq_len=case.seq_len, batch_size=case.batch_size,
                  lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                  grad_clip=o.grad_clip)
    model.load_safetensors(weights)
    return model


@pytest.fixture
def setup(tmp_path):
    def make(**kw):
        case = _case(**kw)
        m = case.model
        probe = Model(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                      vocab_size=m.vocab_size, n_positions=m.n_positions, seq_len=case.seq_len,
                      batch_size=case.batch_size)
        params = init_params([(p.name, p.shape) for p in probe.table], m.n_layer, case.seed)
        weights = tmp_path / "weights.safetensors"
        write_safetensors(weights, params)
        x, y = make_case_data(case)
        return case, weights, x, y
    return make


@pytest.mark.parametrize("layout", [(2, 2, "1f1b", 1, 2), (2, 4, "zb-h1", 1, 2),
                                    (2, 2, "interleaved", 2, 4), (3, 4, "gpipe", 1, 3)])
def test_pipeline_matches_one_stage_engine(setup, tmp_path, layout):
    stages, mbs, schedule, chunks, n_layer = layout
    case, weights, x, y = setup(stages=stages, microbatches=mbs, schedule=schedule,
                                chunks=chunks, n_layer=n_layer)
    control = _control(case, weights)
    losses, grads0 = [], None
    for s in range(case.steps):
        control.zero_grad()
        losses.append(control.forward_backward(x[s], y[s]))
        if s == 0:
            grads0 = control.grads()
        control.optimizer_step()
    res = pipeline.run_pipeline(case, weights, x, y, tmp_path / "run", timeout=120)
    np.testing.assert_allclose(res.losses, losses, rtol=1e-5)
    assert set(res.grads) == set(grads0)
    for name, g in grads0.items():
        rel = np.linalg.norm(res.grads[name] - g) / max(np.linalg.norm(g), 1e-30)
        assert rel < 1e-4 or np.abs(res.grads[name] - g).max() < 1e-9, name
    assert sorted(p.name for p in control.table) == sorted(res.params)
    assert list(res.timeline_dir.glob("timeline_rank*.csv"))
    _assert_timeline_causal(res.timeline_dir)


def _assert_timeline_causal(directory):
    """The ranks' timelines are on one clock: a stage's F starts after the previous stage's F of
    the same micro-batch ended (it waits for that activation), and its B after the next stage's
    B. Ranks whose clocks started apart (Open MPI 5's MPI_Wtime counts from each process's own
    start) break one of the two by the offset."""
    from harness.timeline import load_timelines

    df = load_timelines(directory)
    end = {(int(r.step), r.kind if r.kind == "F" else "B", int(r.stage), int(r.microbatch)):
           float(r.end_us) for r in df.itertuples() if r.kind in ("F", "B", "BW")}
    checked = 0
    for r in df.itertuples():
        if r.kind == "F" and r.stage > 0:
            before = end[(int(r.step), "F", int(r.stage) - 1, int(r.microbatch))]
        elif r.kind in ("B", "BW") and (int(r.step), "B", int(r.stage) + 1,
                                        int(r.microbatch)) in end:
            before = end[(int(r.step), "B", int(r.stage) + 1, int(r.microbatch))]
        else:
            continue
        assert float(r.start_us) >= before - 1.0, (
            f"step {r.step}: {r.kind} of stage {r.stage}, micro-batch {r.microbatch} on rank "
            f"{r.rank} starts {before - float(r.start_us):.0f} us before what it waits for ends")
        checked += 1
    assert checked > 0


def test_rank_exit_brings_job_down_with_its_message(setup, tmp_path):
    case, weights, x, y = setup(steps=4)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 failed: TANDEM_CRASH requested.*step 2"):
        pipeline.run_pipeline(case, weights, x, y, tmp_path / "run", timeout=60,
                              extra_env={"TANDEM_CRASH": "1:2"})
    assert time.monotonic() - t0 < 30


def test_killed_rank_brings_job_down(setup, tmp_path):
    case, weights, x, y = setup(steps=4)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 0 (died|exited).*(SIGKILL|signal 9|137)"):
        pipeline.run_pipeline(case, weights, x, y, tmp_path / "run", timeout=60,
                              extra_env={"TANDEM_CRASH": "0:1:kill"})
    assert time.monotonic() - t0 < 30


def test_bad_weights_on_one_rank_name_the_rank(setup, tmp_path):
    case, weights, x, y = setup()
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated: every rank refuses it
    with pytest.raises(RankFailure, match=r"rank \d failed: .*data_offsets"):
        pipeline.run_pipeline(case, weights, x, y, tmp_path / "run", timeout=60)


def test_non_finite_training_stops_naming_the_step(setup, tmp_path):
    """A learning rate that blows the weights up: every rank stops at the first step whose
    reduced loss or gradient norm is not finite, naming the step and its own stage."""
    case, weights, x, y = setup(steps=8)
    case = dataclasses.replace(case, optim=dataclasses.replace(case.optim, lr=1e5, grad_clip=0.0))
    with pytest.raises(RankFailure, match=r"rank \d failed: TD_ERR_RANGE: step [1-7]: non-finite "
                                          r"(loss|gradient norm) .*this rank's stage \d"):
        pipeline.run_pipeline(case, weights, x, y, tmp_path / "run", timeout=60)


def test_hung_job_is_killed_at_the_timeout(setup, tmp_path):
    case, weights, x, y = setup(steps=50)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"did not finish in 1 s"):
        pipeline.run_pipeline(case, weights, x, y, tmp_path / "run", timeout=1)
    assert time.monotonic() - t0 < 15


def test_schedule_invariance_sweep(tmp_path):
    """The full suite's sweep — GPipe, 1F1B, ZB-H1 x P in {1,2,3,4} x M in {1,2,4,8}, and
    interleaved where it fits — reproduces the one-stage engine at the fp32 gates (~75 s)."""
    import json

    from harness.cli import main

    out = tmp_path / "invariance"
    rc = main(["parity", "--suite", "full", "--case", "invariance",
               "--case", "invariance-interleaved", "--case", "invariance-interleaved-l8",
               "--tier", "schedule", "--out", str(out), "-q"])
    summary = json.loads((out / "parity_summary.json").read_text())
    assert rc == 0, summary
    import pandas as pd

    rows = pd.read_parquet(out / "parity.parquet")
    cases = set(rows.case)
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        for p in (2, 3, 4):
            for m in (1, 2, 4, 8):
                assert f"invariance/schedule={schedule},stages={p},microbatches={m}" in cases
    assert any(c.startswith("invariance-interleaved-l8/stages=4") for c in cases)
    assert (rows.share <= 1).all() and rows.passed.all()


def _flaky_mpirun(tmp_path, fail_times: int, message: str):
    """A stand-in for mpirun that fails `fail_times` times with `message`, then succeeds."""
    count = tmp_path / "count"
    count.write_text("0")
    script = tmp_path / "fake_mpirun.sh"
    script.write_text(f"""#!/bin/sh
n=$(cat {count}); echo $((n + 1)) > {count}
if [ "$n" -lt {fail_times} ]; then echo "{message}" >&2; exit 213; fi
echo ran
""")
    script.chmod(0o755)
    return [str(script)], count


def test_a_launch_that_fails_before_any_rank_starts_is_tried_again(tmp_path):
    from types import SimpleNamespace

    from harness.pipeline import STARTUP_TRIES, _launch

    case = SimpleNamespace(name="c", pipeline=SimpleNamespace(stages=2))
    startup = "The PMIx server's listener thread failed to start. We cannot continue."
    cmd, count = _flaky_mpirun(tmp_path, 1, startup)
    rc, stdout, _, _ = _launch(cmd, {}, 30, case, tmp_path)
    assert rc == 0 and stdout.strip() == "ran" and count.read_text().strip() == "2"
    assert "--- attempt 2 ---" in (tmp_path / "mpirun.log").read_text()
    # always failing at start-up: STARTUP_TRIES launches, then the failure is returned
    cmd, count = _flaky_mpirun(tmp_path, 99, startup)
    rc, _, stderr, _ = _launch(cmd, {}, 30, case, tmp_path)
    assert rc == 213 and "listener thread failed" in stderr
    assert count.read_text().strip() == str(STARTUP_TRIES)
    # a rank's own failure is never run twice
    cmd, count = _flaky_mpirun(tmp_path, 1, "tandem-engine: rank 1: TD_ERR_FORMAT: bad weights")
    rc, _, _, _ = _launch(cmd, {}, 30, case, tmp_path)
    assert rc == 213 and count.read_text().strip() == "1"
