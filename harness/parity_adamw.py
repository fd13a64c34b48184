"""Parameters after AdamW steps, compared where AdamW is well conditioned: the per-element scale
AdamW divided by (AdamScale), the rows that use it, and the reference trajectory that records it.
Not here: the tiers that run the steps (harness/parity_tiers.py).
"""

from __future__ import annotations

import numpy as np

from harness import tolerances as tol
from harness.config import CaseConfig
from harness.parity_rows import Collector
from harness.records import ParityRow


# AdamW is ill-conditioned where the gradient history of an element is near zero: its update
# lr * m_hat / (sqrt(v_hat) + eps) then has a slope of up to ~lr/eps (1e5 at the defaults) in g,
# so a last-bit difference in such a gradient (the rounding of a sum that cancels: ~1e-11..1e-9
# here, and sometimes an exact 0 on one side only) moves the parameter by a sizeable fraction of
# lr, and the two sides walk apart. The key third of attn.c_attn.bias is such a place by
# construction (its exact gradient is zero: the softmax ignores a constant added to a row of
# scores), and any large tensor holds a few elements whose gradient happens to cancel.
# Parameters after optimizer steps are therefore compared on the elements whose sqrt(v_hat) (the
# RMS gradient AdamW divided by) stayed above tolerances.ADAMW_ILL_CONDITIONED * eps at every
# step on both sides; the others (counted in the row's label) must only stay within the largest
# difference a correct pair can reach, 2 * lr per step. Elements whose gradient was exactly zero
# throughout on both sides (e.g. wpe rows >= T) only decay, identically: compared normally.


class AdamScale:
    """Per element, over the steps of a run: the smallest sqrt(v_hat) AdamW divided by (v_hat: the
    bias-corrected second moment of the clipped gradient, as in docs/model.md) and the largest
    |clipped gradient|. The two sides of a comparison are merged by min / max."""

    def __init__(self, beta2: float):
        self.beta2, self.t = beta2, 0
        self.v: dict[str, np.ndarray] = {}
        self.lo: dict[str, np.ndarray] = {}
        self.hi: dict[str, np.ndarray] = {}

    def fold(self, name: str, lo, hi) -> None:
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        if name in self.lo:
            lo, hi = np.minimum(self.lo[name], lo), np.maximum(self.hi[name], hi)
        self.lo[name], self.hi[name] = lo, hi

    def step(self, grads: dict, grad_norm: float, grad_clip: float) -> None:
        """One optimizer step's gradients (before clipping) and pre-clip global norm."""
        self.t += 1
        clip = grad_clip / grad_norm if 0 < grad_clip < grad_norm else 1.0
        for name, g in grads.items():
            g = np.asarray(g, np.float64) * clip
            v = self.beta2 * self.v.get(name, 0.0) + (1.0 - self.beta2) * g * g
            self.v[name] = v
            self.fold(name, np.sqrt(v / (1.0 - self.beta2 ** self.t)), np.abs(g))

    def merge(self, other: "AdamScale") -> "AdamScale":
        for name in other.lo:
            self.fold(name, other.lo[name], other.hi[name])
        return self

    def ill_conditioned(self, name: str, floor: float) -> np.ndarray:
        return (self.lo[name] <= floor) & (self.hi[name] > 0)


def _param_rows(col: Collector, tier: str, table, got: dict, want: dict, seen: AdamScale,
                case: CaseConfig, steps: int, reference: str = "jax") -> list[ParityRow]:
    rows = []
    floor = tol.ADAMW_ILL_CONDITIONED * case.optim.eps
    bound = 2.0 * case.optim.lr * steps
    for p in table:
        name = f"param/{p.name}"
        if p.name not in got:
            rows.append(col.missing(tier, name, "param", "missing from the run", reference))
            continue
        a = np.asarray(got[p.name], np.float64).ravel()
        b = np.asarray(want[p.name], np.float64).ravel()
        ill = seen.ill_conditioned(p.name, floor).ravel()
        k = int(ill.sum())
        if k == 0:
            rows.append(col.row(tier, name, "param", a, b, reference))
            continue
        rows.append(col.row(tier, f"{name} ({k} of {a.size} ill-cond.)", "param", a[~ill],
                            b[~ill], reference))
        worst = float(np.max(np.abs(a[ill] - b[ill])))
        if not worst <= bound:
            rows.append(col.missing(tier, f"{name}[ill-cond.]", "param",
                                    f"differ by {worst:.2e} > 2 * lr * steps = {bound:.2e}",
                                    reference))
    return rows


def _reference_trajectory(params, batches, cfg, opt, microbatches):
    """reference.train.make_train_step over `batches` from a fresh AdamW state, also reading
    AdamW's own second moment after each step for the AdamScale of the run.
    Returns (final params, losses (K,), AdamScale), numpy."""
    import jax
    import jax.numpy as jnp

    from reference import adamw_init, make_train_step

    step = make_train_step(cfg, opt, microbatches)
    state = adamw_init(params)
    lo = jax.tree.map(lambda p: jnp.full(p.shape, jnp.inf, jnp.float32), params)
    losses = []
    for t, (tokens, targets) in enumerate(batches, 1):
        params, state, loss, _ = step(params, state, tokens, targets)
        bc2 = 1.0 - opt.beta2 ** t
        lo = jax.tree.map(lambda m, v: jnp.minimum(m, jnp.sqrt(v / bc2)), lo, state.v)
        losses.append(loss)
    scale = AdamScale(opt.beta2)
    lo, v = jax.device_get(lo), jax.device_get(state.v)
    for k in lo:  # v > 0 at the end <=> some step had a non-zero gradient
        scale.fold(k, lo[k], np.sqrt(np.asarray(v[k], np.float64)))
    final = {k: np.asarray(a) for k, a in jax.device_get(params).items()}
    return final, np.asarray(jax.device_get(losses)), scale
