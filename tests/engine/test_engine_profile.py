"""The CPU per-phase profile (model key profile) and the OpenMP wait setting the binding picks.

The profile must count every phase a training step runs, stay at zero when off, reset, and
leave the numbers alone; the spin setting must only appear when the threads fit free cores.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine_util import TINY, tokens_for
from harness import engine as eng
from harness import omp_wait
from harness.engine import Model

PHASES = {"encoder_fwd", "layernorm_fwd", "matmul_fwd", "attention_fwd", "residual_fwd",
          "gelu_fwd", "lm_head_fwd", "softmax_ce_fwd", "softmax_ce_bwd", "lm_head_bwd_input",
          "matmul_bwd_input", "gelu_bwd", "attention_bwd", "layernorm_bwd_input", "copy_bwd",
          "lm_head_bwd_weight", "matmul_bwd_weight", "layernorm_bwd_weight", "encoder_bwd",
          "adamw"}
LLAMA_PHASES = {"rmsnorm_fwd", "rope_fwd", "swiglu_fwd", "rmsnorm_bwd_input",
                "rmsnorm_bwd_weight", "rope_bwd", "swiglu_bwd"}  # the Llama family's own ops


def _steps(model: Model, n: int = 2) -> list[float]:
    x, y = tokens_for(TINY, seed=3)
    return [model.train_step(x, y)[0] for _ in range(n)]


@pytest.mark.parametrize("clock", [1, 2])
def test_profile_counts_every_phase(clock):
    with Model(**TINY, profile=clock) as m:
        _steps(m, 2)
        table = m.profile()
    assert set(table) == PHASES | LLAMA_PHASES
    assert all(table[k][1] == 0 for k in LLAMA_PHASES)  # GPT-2 runs none of them
    L = TINY["n_layer"]
    calls = {k: n for k, (_, n) in table.items()}
    assert calls["matmul_fwd"] == 2 * 4 * L and calls["attention_bwd"] == 2 * L
    assert calls["adamw"] == 2 and calls["layernorm_fwd"] == 2 * (2 * L + 1)
    assert all(s >= 0 for s, _ in table.values())
    assert sum(s for s, _ in table.values()) > 0


def test_profile_counts_the_llama_phases():
    """A Llama step reports its RMSNorm, RoPE and SwiGLU phases and the shared ones (products,
    attention, head, embedding); GPT-2's LayerNorm and GELU phases stay at zero."""
    llama = dict(family="llama", n_layer=2, n_embd=16, n_head=4, n_kv_head=2, vocab_size=23,
                 n_positions=8, ffn_dim=24, seq_len=5, batch_size=2, threads=1)
    with Model(**llama, profile=1) as m:
        _steps(m, 2)
        calls = {k: n for k, (_, n) in m.profile().items()}
    L = llama["n_layer"]
    assert calls["rmsnorm_fwd"] == 2 * (2 * L + 1) and calls["rmsnorm_bwd_weight"] == 2 * (2 * L + 1)
    assert calls["rope_fwd"] == calls["rope_bwd"] == 2 * 2 * L
    assert calls["swiglu_fwd"] == calls["swiglu_bwd"] == 2 * L
    assert calls["matmul_fwd"] == 2 * 7 * L and calls["attention_bwd"] == 2 * L
    assert calls["lm_head_fwd"] == 2 and calls["encoder_bwd"] == 2 and calls["adamw"] == 2
    assert calls["layernorm_fwd"] == calls["gelu_fwd"] == 0


def test_profile_off_reset_and_same_numbers():
    with Model(**TINY) as off, Model(**TINY, profile=1) as on:
        on.set_params(off.params())
        assert _steps(off) == _steps(on)
        assert all(n == 0 for _, n in off.profile().values())
        for name, p in off.params().items():
            np.testing.assert_array_equal(p, on.params()[name])
        on.profile_reset()
        assert all(s == 0 and n == 0 for s, n in on.profile().values())


def test_spin_only_when_threads_fit_free_cores(monkeypatch):
    monkeypatch.setattr(omp_wait, "_USER_SPINCOUNT", False)
    monkeypatch.setattr(omp_wait, "cores_available", lambda: 4)
    monkeypatch.setattr(omp_wait, "cores_busy_elsewhere", lambda samples=5: 1)
    assert eng.spin_env(3) == {"GOMP_SPINCOUNT": eng.SPIN_COUNT}
    assert eng.spin_env(4) == {}  # one core is busy elsewhere: passive only
    monkeypatch.setattr(omp_wait, "_USER_SPINCOUNT", True)
    assert eng.spin_env(1) == {}  # the caller's own setting stands


def test_wait_policy_recorded():
    Model(**TINY).close()
    assert set(eng.WAIT_POLICY) == {"libgomp_preloaded", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}


def test_pipeline_ranks_spin_only_when_all_fit(monkeypatch):
    from harness import pipeline
    if pipeline.unavailable() is not None:  # _mpi_env resolves mpirun's library directory
        pytest.skip(pipeline.unavailable())
    monkeypatch.setattr(omp_wait, "_USER_SPINCOUNT", False)
    monkeypatch.setattr(omp_wait, "cores_available", lambda: 2)
    monkeypatch.setattr(omp_wait, "cores_busy_elsewhere", lambda samples=5: 0)
    monkeypatch.setenv("GOMP_SPINCOUNT", eng.SPIN_COUNT)  # as the binding may have set it
    assert pipeline._mpi_env(1, "cpu", ranks=2)["GOMP_SPINCOUNT"] == eng.SPIN_COUNT
    assert "GOMP_SPINCOUNT" not in pipeline._mpi_env(1, "cpu", ranks=4)  # 4 ranks, 2 cores
    monkeypatch.setattr(omp_wait, "_USER_SPINCOUNT", True)
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    assert pipeline._mpi_env(1, "cpu", ranks=4)["GOMP_SPINCOUNT"] == "7"


def test_busy_elsewhere_excludes_this_process(monkeypatch):
    # the machine's busy ticks rise by 150 over the window (100 ticks a second assumed), this
    # process's own threads used 0.5 s of it: 1.0 core's worth was someone else's
    ticks = iter([(1000, 5000), (1150, 5200)])
    own = iter([10.0, 10.5])
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(omp_wait, "_cpu_jiffies", lambda: next(ticks))
    monkeypatch.setattr(omp_wait, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(omp_wait.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(omp_wait.time, "sleep", lambda s: None)
    monkeypatch.setattr(omp_wait.os, "sysconf", lambda name: 100)
    assert omp_wait.cpu_busy_elsewhere() == pytest.approx(1.0)


def test_busy_elsewhere_falls_back_to_load_average(monkeypatch):
    monkeypatch.setattr(omp_wait, "_cpu_jiffies", lambda: None)
    monkeypatch.setattr(omp_wait.os, "getloadavg", lambda: (1.6, 1.0, 1.0))
    assert omp_wait.cpu_busy_elsewhere() is None
    assert omp_wait.cores_busy_elsewhere(samples=0) == 2


def test_busy_elsewhere_sees_another_process_not_our_threads():
    import subprocess
    import sys
    import threading
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert omp_wait.cpu_busy_elsewhere(0.3) > 0.5  # a whole core spinning elsewhere
    finally:
        spinner.kill()
        spinner.wait()
    # what is subtracted as this process's own: every thread's CPU time, a spinning helper
    # thread's included (os.times); the arithmetic of the subtraction is the test above
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            pass

    before = omp_wait._own_cpu_s()
    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert omp_wait._own_cpu_s() - before > 0.1
