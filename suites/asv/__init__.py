"""asv benchmarks for Tandem: shared helpers for the bench_<area>.py modules beside this file.

The benchmarks run the `cpu-smoke` suite's cases (the same TOML `tandem bench --suite cpu-smoke`
reads) and report lower-is-better numbers only, because asv flags regressions only that way. Every
metric is a `track_` benchmark: asv calls it once, so warm-up and repeats happen in here. Nothing
heavy is imported at module level: asv imports every module to discover benchmarks, and one that
fails to import takes the whole suite down. A missing optional piece (JAX, the reference, mpirun,
valgrind, a case an older commit lacks) raises NotImplementedError, which asv reports as skipped.
How to run them, and the regression gate over them: docs/asv.md.
"""

from __future__ import annotations

import os
import statistics
import time

SUITE = "cpu-smoke"  # harness/config.py load_suite name; suites/cpu-smoke.toml
# Declared, not discovered: history needs stable parameters. One-stage cases run in this
# process; pipelined ones as mpirun jobs, whose times are far noisier on a shared machine (two
# ranks must be scheduled at once), so they live in classes of their own with their own gates.
ONE_STAGE = ("tiny",)
PIPELINED = ("tiny-1f1b-p2m4",)
CASES = ONE_STAGE + PIPELINED


def quick() -> bool:
    """Fewer inner repeats, asked for by `tandem regress --quick` (and CI's smoke run) through
    the variable harness.regress.QUICK_ENV names: the gate owns the name, the benchmarks read it
    (the arrow goes suites -> harness). A commit installed without the gate has no quick mode."""
    try:
        from harness.regress import QUICK_ENV
    except ImportError:
        return False
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def skip(why: str) -> NotImplementedError:
    """The exception a setup raises to make asv skip a benchmark (shown as n/a)."""
    return NotImplementedError(why)


def need(module: str):
    """Import `module` or skip: an optional piece missing here (or in an older commit)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a module broken at import
        raise skip(f"{module} unavailable: {type(exc).__name__}: {exc}") from None


def load_case(name: str):
    """The CaseConfig `name` of the benchmark suite, or skip."""
    config = need("harness.config")
    try:
        return config.load_suite(SUITE).case(name)
    except Exception as exc:  # noqa: BLE001 - ConfigError: the case or suite is absent
        raise skip(f"suite {SUITE!r} case {name!r}: {exc}") from None


def tokens_per_step(case) -> int:
    return case.batch_size * case.seq_len


def microbatch(case) -> int:
    return case.batch_size // case.pipeline.microbatches


def engine_config(case, threads: int) -> dict:
    """harness.engine.Model keys for a one-stage model of `case` (batch_size = micro-batch)."""
    m, o = case.model, case.optim
    return dict(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, vocab_size=m.vocab_size,
                n_positions=m.n_positions, seq_len=case.seq_len, batch_size=microbatch(case),
                threads=threads, lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                weight_decay=o.weight_decay, grad_clip=o.grad_clip)


def threads() -> int:
    """Engine threads: every core, as `tandem bench` uses (JAX's CPU client does too)."""
    return os.cpu_count() or 1


def case_data(case, steps: int | None = None):
    """(inputs_SBT, targets_SBT) for the case: make_case_data's `case.steps` batches, which the
    timed loops cycle through (both sides see the same tokens)."""
    data = need("harness.data")
    if steps is None:
        return data.make_case_data(case)
    return data.batches(data.case_tokens(case), case.batch_size, case.seq_len, steps, case.seed)


def init_weights(case) -> dict:
    """Seeded fp32 parameters of the whole model (harness.init), over the engine's table."""
    engine, init = need("harness.engine"), need("harness.init")
    with engine.Model(**engine_config(case, 1)) as probe:
        table = [(p.name, p.shape) for p in probe.table]
    return init.init_params(table, case.model.n_layer, case.seed)


class EngineSide:
    """The one-stage engine in this process: `step()` runs one optimizer step (M micro-batches,
    AdamW) on the next batch and returns its wall seconds."""

    def __init__(self, case, params: dict, n_threads: int | None = None):
        if case.pipeline.stages != 1:
            raise skip(f"case {case.name!r} is pipelined: no in-process engine")
        engine = need("harness.engine")
        self.case = case
        self.model = engine.Model(**engine_config(case, n_threads or threads()))
        self.model.set_params(params)
        self.x, self.y = case_data(case)
        self.M, self.b, self.i = case.pipeline.microbatches, microbatch(case), 0

    def step(self) -> float:
        T = self.case.seq_len
        k = self.i % len(self.x)
        self.i += 1
        x = self.x[k].reshape(self.M, self.b, T)
        y = self.y[k].reshape(self.M, self.b, T)
        t0 = time.perf_counter()
        self.model.train_step(x, y)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.model.close()


class JaxSide:
    """The JAX reference step (reference.train.make_train_step: jit, gradient accumulation over
    the case's M micro-batches, AdamW), fp32 at "highest" matmul precision as `tandem bench`
    runs it. A pipelined case runs this single-device control (the maths every schedule must
    reproduce). `step()` includes the device sync."""

    def __init__(self, case, params: dict):
        self.jax = need("jax")
        jnp = need("jax.numpy")
        gpt2, optim, train = (need("reference.gpt2"), need("reference.optim"),
                              need("reference.train"))
        self.jax.config.update("jax_default_matmul_precision", "highest")
        m, o = case.model, case.optim
        cfg = gpt2.GPTConfig(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                             vocab_size=m.vocab_size, n_positions=m.n_positions)
        opt = optim.AdamWConfig(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                                weight_decay=o.weight_decay, grad_clip=o.grad_clip)
        try:
            self.fn = train.make_train_step(cfg, opt, case.pipeline.microbatches)
        except Exception as exc:  # noqa: BLE001 - an older reference with another signature
            raise skip(f"reference.train.make_train_step: {type(exc).__name__}: {exc}") from None
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.state = optim.adamw_init(self.params)
        x, y = case_data(case)
        self.x = [jnp.asarray(a) for a in x]
        self.y = [jnp.asarray(a) for a in y]
        self.i = 0
        self.first_call_s = self.step()  # trace + compile + one step: never timed

    def step(self) -> float:
        k = self.i % len(self.x)
        self.i += 1
        t0 = time.perf_counter()
        out = self.fn(self.params, self.state, self.x[k], self.y[k])
        self.jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        self.params, self.state = out[0], out[1]
        return dt


def pin_to_one_cpu() -> int:
    """Confine this process, and the threads it starts from now on, to one CPU of its affinity
    set, and ask XLA for single-threaded Eigen kernels (read when JAX starts, so call this before
    JAX is imported). Two thread pools that spin and synchronise across cores (OpenMP, XLA) are
    hurt by a neighbour's load far more than a single thread is, and not by the same amount, so
    a ratio of multi-threaded times moves with the load; on one core it does not."""
    if not hasattr(os, "sched_setaffinity"):
        raise skip("no CPU affinity on this platform (os.sched_setaffinity): cannot pin")
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    flag = "--xla_cpu_multi_thread_eigen=false"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    return cpus[-1]


def timed(step, warmup: int, n: int) -> list[float]:
    """`warmup` untimed calls of step(), then the seconds of `n` timed ones."""
    for _ in range(warmup):
        step()
    return [step() for _ in range(n)]


def median(xs) -> float:
    return float(statistics.median(xs))


def best(xs) -> float:
    """The fastest of many timed steps: the raw-time estimator. On a shared machine noise only
    ever adds time, and a neighbour's load moved the median of identical runs by up to 4.5x here
    where the minimum moved by tens of percent. A real slowdown slows every step, the best too."""
    return float(min(xs))


def pipeline_steps(case, params: dict, steps: int, warmup: int, workdir) -> list[float]:
    """Seconds per step of one pipelined engine job (mpirun, one rank per stage, every core
    shared between the ranks), the first `warmup` steps dropped. Skips without mpirun or
    tandem-engine."""
    from pathlib import Path

    pipeline, init = need("harness.pipeline"), need("harness.init")
    try:
        pipeline.find_mpirun()
        pipeline.engine_executable()
    except Exception as exc:  # noqa: BLE001 - RankFailure: no mpirun / no tandem-engine
        raise skip(str(exc)) from None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / "weights.safetensors"
    if not weights.exists():
        init.write_safetensors(weights, params)
    x, y = case_data(case)
    idx = [i % len(x) for i in range(warmup + steps)]
    run = workdir / f"job{len(list(workdir.glob('job*')))}"
    res = pipeline.run_pipeline(case, weights, x[idx], y[idx], run, timeout=300.0,
                                threads=max(1, threads() // case.pipeline.stages))
    return [float(s) for s in res.step_s[warmup:]]
