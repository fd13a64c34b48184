"""The rows of `tandem parity`: comparisons turned into ParityRows with the policy's tolerance
(Collector), a tier's rows (TierResult), and how they are printed and summarised.
Not here: what is compared (harness/parity_tiers.py) or the tolerances (harness/tolerances.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from harness import tolerances as tol
from harness.config import CaseConfig
from harness.records import ParityRow

TEXT_CURVE_ROWS = 25  # at most this many steps of a real-text loss curve are printed


# ---- collecting comparisons --------------------------------------------------------------------


@dataclass
class TierResult:
    rows: list[ParityRow] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(r.passed for r in self.rows)


class Collector:
    """Turns (tensor, got, want) into ParityRows with the policy's tolerance."""

    def __init__(self, suite: str, case: CaseConfig, backend: str, commit: str, stamp: str):
        self.suite, self.case, self.backend = suite, case, backend
        self.commit, self.stamp = commit, stamp

    def row(self, tier: str, tensor: str, kind: str, got, want, reference: str = "jax"
            ) -> ParityRow:
        t = tol.tolerance(self.case.dtype, tier, kind)
        try:
            e = tol.measure(got, want)
        except ValueError as exc:  # shapes differ: a failure to report, not a crash
            e = tol.Errors(float("inf"), float("inf"), float("inf"))
            tensor = f"{tensor} ({exc})"
        err = tol.error_for(e, t)
        return ParityRow(suite=self.suite, case=self.case.name, tier=tier, tensor=tensor,
                         max_abs=e.max_abs, rel_l2=e.rel_l2, rel=e.rel, metric=t.metric,
                         tol=t.value, share=err / t.value, passed=bool(err <= t.value),
                         backend=self.backend, dtype=self.case.dtype, reference=reference,
                         commit=self.commit, timestamp=self.stamp)

    def missing(self, tier: str, tensor: str, kind: str, why: str, reference: str = "jax"
                ) -> ParityRow:
        t = tol.tolerance(self.case.dtype, tier, kind)
        inf = float("inf")
        return ParityRow(suite=self.suite, case=self.case.name, tier=tier,
                         tensor=f"{tensor} ({why})", max_abs=inf, rel_l2=inf, rel=inf,
                         metric=t.metric, tol=t.value, share=inf, passed=False,
                         backend=self.backend, dtype=self.case.dtype, reference=reference,
                         commit=self.commit, timestamp=self.stamp)


# ---- output ------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    if x == float("inf"):
        return "inf"
    return f"{x:.2e}"


def _verdict(r: ParityRow) -> str:
    if not r.passed:
        return "FAIL"
    return "PASS bit-identical" if r.tier == "schedule" and r.max_abs == 0 else "PASS"


def print_case_table(name: str, results: dict[str, TierResult], worst: int, quiet: bool,
                     out=None) -> None:
    """One case's rows: every failure, then (unless quiet) the `worst` passes of each tier by
    share of tolerance and a count of the rest; skipped and errored tiers say why."""
    out = out or sys.stdout
    shown: list[tuple[str, ParityRow | str]] = []  # (tier, row or a note)
    for tier, res in results.items():
        if res.skipped:
            shown.append((tier, f"skipped: {res.skipped}"))
            continue
        if res.error:
            shown.append((tier, f"ERROR: {res.error}"))
        fails = [r for r in res.rows if not r.passed]
        passes = sorted((r for r in res.rows if r.passed), key=lambda r: -r.share)
        shown += [(tier, r) for r in fails + ([] if quiet else passes[:worst])]
        rest = len(passes) - min(worst, len(passes))
        if rest > 0 and not quiet:
            ident = sum(1 for r in passes if r.max_abs == 0)
            extra = f", {ident} bit-identical" if tier == "schedule" and ident else ""
            worst_rest = passes[min(worst, len(passes))].share
            shown.append((tier, f"... {rest} more passed (each <= {100 * worst_rest:.1f}% of "
                                f"tolerance{extra})"))
    if not shown:
        return
    rows = [r for _, r in shown if isinstance(r, ParityRow)]
    w = max([44] + [len(r.tensor) for r in rows])
    print(f"\ncase {name}", file=out)
    if rows:
        print(f"  {'tier':<10}  {'tensor':<{w}} {'max abs':>9} {'rel L2':>9} {'share':>9}  verdict",
              file=out)
    for tier, r in shown:
        if isinstance(r, str):
            print(f"  {tier:<10}  {r}", file=out)
        else:
            print(f"  {tier:<10}  {r.tensor:<{w}} {_fmt(r.max_abs):>9} {_fmt(r.rel_l2):>9}"
                  f" {100 * r.share:>8.1f}%  {_verdict(r)}", file=out)


def print_text_curve(name: str, losses: list, out=None) -> None:
    """Side-by-side loss curves of a real-text case (engine vs JAX)."""
    out = out or sys.stdout
    eng = {s: v for c, side, s, v in losses if c == name and side == "engine"}
    jx = {s: v for c, side, s, v in losses if c == name and side == "jax"}
    steps = sorted(set(eng) & set(jx))
    if not steps:
        return
    stride = max(1, -(-len(steps) // TEXT_CURVE_ROWS))
    print(f"  loss curve on real text (case {name}):", file=out)
    print(f"  {'step':>6} {'engine':>12} {'jax':>12} {'rel':>9}", file=out)
    for s in steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else []):
        rel = abs(eng[s] - jx[s]) / abs(jx[s]) if jx[s] else float("inf")
        print(f"  {s:>6} {eng[s]:>12.6f} {jx[s]:>12.6f} {_fmt(rel):>9}", file=out)


def tier_summary(res: TierResult) -> dict:
    worst = max(res.rows, key=lambda r: r.share, default=None)
    return {
        "passed": res.passed if not res.skipped else None,
        "skipped": res.skipped,
        "error": res.error,
        "compared": len(res.rows),
        "failed": sum(1 for r in res.rows if not r.passed),
        "bit_identical": sum(1 for r in res.rows if r.max_abs == 0),
        "worst_tensor": worst.tensor if worst else None,
        "worst_share": worst.share if worst else None,
    }
