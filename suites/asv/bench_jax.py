"""JAX reference speed on the cpu-smoke cases: ms per optimizer step, lower-is-better.

The step is reference.train.make_train_step (jit; the first call, which compiles, is never
timed), fp32 at "highest" matmul precision, gradient accumulation over the case's M micro-
batches; the value is the best of 60 steps after 5 warm-up ones (as bench_engine.py). A
pipelined case runs this single-device control here (the JAX GPipe baseline needs one XLA device
per stage, fixed before JAX starts; `tandem bench` does that). This tracks the framework side, so
an engine/JAX ratio that moves can be told apart from a JAX that moved. Not here: the engine
(bench_engine.py), the ratio itself (bench_ratio.py).
"""

from __future__ import annotations

from . import CASES, JaxSide, best, init_weights, load_case, quick, skip, timed


class JaxStep:
    """JAX step time per cpu-smoke case; `case` is the suite's case name."""

    params = [list(CASES)]
    param_names = ["case"]
    timeout = 300

    def setup_cache(self):
        out = {}  # reasons are stored, not raised (see bench_engine.EngineStep.setup_cache)
        for name in CASES:
            try:
                case = load_case(name)
                side = JaxSide(case, init_weights(case))
                out[name] = {"step_s": best(timed(side.step, warmup=5,
                                                  n=20 if quick() else 60)),
                             "first_call_s": side.first_call_s}
            except NotImplementedError as exc:
                out[name] = {"skip": str(exc)}
        return out

    def setup(self, cache, case):
        if "skip" in cache[case]:
            raise skip(cache[case]["skip"])

    def track_ms_per_step(self, cache, case):
        return cache[case]["step_s"] * 1e3

    track_ms_per_step.unit = "ms/step"
    track_ms_per_step.version = "1"
