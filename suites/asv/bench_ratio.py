"""Engine time ÷ JAX time per optimizer step on the cpu-smoke cases, measured in one process,
lower-is-better: the metric the regression gate leans on (docs/asv.md).

On a shared, noisy machine absolute times drift by several times between runs minutes apart,
but a slowdown that hits both sides at the same moment cancels in a ratio. So the sides
alternate, and for one-stage cases both run on one pinned CPU with one thread each (engine
threads = 1, XLA single-threaded): multi-threaded sides suffer a neighbour's load unequally,
which moved the all-core ratio from 1.2 to 3.7 here, while the one-CPU ratio held within 17 %.
Pipelined cases alternate blocks (one mpirun job, then as many JAX steps; unpinned, the ranks
need their own cores; the best step of each side per block) and stay far noisier. The JAX side
of a pipelined case is the single-device control (bench_jax.py says why).
"""

from __future__ import annotations

import tempfile

from . import ONE_STAGE, PIPELINED, EngineSide, JaxSide, best, init_weights, load_case, median
from . import pin_to_one_cpu, pipeline_steps, quick, timed


class EngineOverJax:
    """One-stage cases, one CPU, one thread per side: the median of the per-pair ratios over
    60 (quick: 20) alternating engine/JAX step pairs, after 5 warm-up pairs."""

    params = [list(ONE_STAGE)]
    param_names = ["case"]
    timeout = 300

    def setup(self, case):
        self.case = load_case(case)
        pin_to_one_cpu()  # before JAX starts and before the engine's OpenMP pool exists
        weights = init_weights(self.case)
        self.jax = JaxSide(self.case, weights)  # compiles now, outside any timing
        self.engine = EngineSide(self.case, weights, n_threads=1)

    def teardown(self, case):
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    def track_time_ratio(self, case):
        pairs = 20 if quick() else 60
        for _ in range(5):
            self.engine.step()
            self.jax.step()
        return median(self.engine.step() / self.jax.step() for _ in range(pairs))

    track_time_ratio.unit = "engine/JAX"
    track_time_ratio.version = "1"


class PipelineOverJax:
    """Pipelined cases: the median over 3 (quick: 2) blocks of the ratio of the best steps, one
    block = one mpirun job of 12 timed steps (after 3 warm-up steps), then 12 JAX steps."""

    params = [list(PIPELINED)]
    param_names = ["case"]
    timeout = 300

    def setup(self, case):
        self.case = load_case(case)
        self.weights = init_weights(self.case)
        self.jax = JaxSide(self.case, self.weights)

    def track_time_ratio(self, case):
        ratios = []
        with tempfile.TemporaryDirectory(prefix="tandem-asv-") as work:
            for _ in range(2 if quick() else 3):
                e = best(pipeline_steps(self.case, self.weights, 12, 3, work))
                j = best(timed(self.jax.step, warmup=3, n=12))
                ratios.append(e / j)
        return median(ratios)

    track_time_ratio.unit = "engine/JAX"
    track_time_ratio.version = "1"
