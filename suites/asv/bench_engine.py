"""Engine speed on the cpu-smoke cases: ms per optimizer step, seconds per million tokens, and
peak ÷ achieved FLOP/s (1/MFU), all lower-is-better.

One measurement per case is taken in setup_cache (one process: warm-up, then many timed steps,
the fastest of them: see suites/asv/__init__.py best()) and the three track_ methods read it, so
the three numbers agree. EngineStep runs the
one-stage cases in process through harness.engine.Model (every core, as `tandem bench`);
PipelineStep the pipelined ones as mpirun jobs (harness.pipeline, one rank per stage). Raw times
move with the machine's load: docs/asv.md says how the gate treats each class. Not here: JAX
(bench_jax.py), the engine/JAX ratio (bench_ratio.py), instruction counts (bench_instr.py).
"""

from __future__ import annotations

import tempfile

from . import ONE_STAGE, PIPELINED, EngineSide, best, init_weights, load_case, need
from . import pipeline_steps, quick, skip, timed, tokens_per_step


def _peak(n: int = 1024) -> float:
    """This machine's fp32 GEMM peak, measured now with harness.envinfo (numpy, every core):
    2·n³ over the fastest of 10 products, as the engine's step is the fastest of many (the
    median, which envinfo reports, moved 3x between runs here under a neighbour's load)."""
    envinfo = need("harness.envinfo")
    r = envinfo.measure_cpu_gemm_peak(n=n, repeats=10)
    return 2.0 * n**3 / min(r.get("times") or [r["seconds"]])


class _StepMetrics:
    """The three track_ methods over a setup_cache of {case: {"step_s", "tokens",
    "flops_per_token"} or {"skip": reason}, "peak_flops": FLOP/s or None}."""

    param_names = ["case"]
    timeout = 300

    def measure(self, case, params, workdir: str) -> list[float]:
        raise NotImplementedError

    def _measure_all(self):
        # Reasons are stored, not raised: a raising setup_cache fails every benchmark of the
        # class, while setup() below turns a stored reason into a skip of that case only.
        out = {}
        with tempfile.TemporaryDirectory(prefix="tandem-asv-") as work:
            for name in self.params[0]:
                try:
                    case = load_case(name)
                    step_s = self.measure(case, init_weights(case), f"{work}/{case_slug(name)}")
                    out[name] = {"step_s": best(step_s), "tokens": tokens_per_step(case),
                                 "flops_per_token": need("harness.flops").flops_for_case(case)}
                except NotImplementedError as exc:
                    out[name] = {"skip": str(exc)}
        try:
            out["peak_flops"] = _peak()
        except NotImplementedError:
            out["peak_flops"] = None
        return out

    def setup(self, cache, case):
        if "skip" in cache[case]:
            raise skip(cache[case]["skip"])

    def track_ms_per_step(self, cache, case):
        return cache[case]["step_s"] * 1e3

    track_ms_per_step.unit = "ms/step"
    track_ms_per_step.version = "1"

    def track_s_per_mtok(self, cache, case):
        r = cache[case]
        return r["step_s"] / r["tokens"] * 1e6

    track_s_per_mtok.unit = "s/Mtok"
    track_s_per_mtok.version = "1"

    def track_peak_over_achieved(self, cache, case):
        """Measured fp32 GEMM peak ÷ the engine's model FLOP/s (6N + 6LTC per token): 1/MFU."""
        if not cache.get("peak_flops"):
            return float("nan")  # no peak measurable here: shown as n/a
        r = cache[case]
        return cache["peak_flops"] / (r["flops_per_token"] * r["tokens"] / r["step_s"])

    track_peak_over_achieved.unit = "peak/achieved"
    track_peak_over_achieved.version = "1"


def case_slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class EngineStep(_StepMetrics):
    """One-stage engine, in process, every core: 5 warm-up steps, then the best of 60 (quick:
    20)."""

    params = [list(ONE_STAGE)]

    def setup_cache(self):  # defined per class: asv keys the cache by its source line
        return self._measure_all()

    def measure(self, case, params, workdir):
        side = EngineSide(case, params)
        try:
            return timed(side.step, warmup=5, n=20 if quick() else 60)
        finally:
            side.close()


class PipelineStep(_StepMetrics):
    """Pipelined engine (mpirun, one rank per stage, the cores shared between the ranks): the
    best step over 2 jobs (quick: 1) of 12 timed steps after 3 warm-up steps each."""

    params = [list(PIPELINED)]

    def setup_cache(self):
        return self._measure_all()

    def measure(self, case, params, workdir):
        step_s = []
        for _ in range(1 if quick() else 2):  # pooled: one launch can land on a busy second
            step_s += pipeline_steps(case, params, steps=12, warmup=3, workdir=workdir)
        return step_s
