"""Before/after comparison of two results directories: `compare(base, new, out, threshold)`.

What it is: matching medians per (case, side, metric) between a base and a new run, judging
each against the metric's good direction, and rendering the regressions, the full before/after
table, a change figure and parity changes to OUT/index.html + report.md (+ compare.csv).
What it is not: a statistical test — one threshold on the ratio of medians; noisy machines
need repeats (the spread is in each run's own report).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness.errors import ConfigError
from reports import figures, tables
from reports.build import FIG_DIR, prepare_out
from reports.doc import Card, Document, Figure, Note, Section, Table, write
from reports.load import HIGHER_IS_BETTER, LOWER_IS_BETTER, finite, load, summarize

KEY = ["label", "side", "metric"]
# (metric, side) pairs of the headline before/after table; every row is in "All metrics".
HEADLINE = {("tokens_per_s", "engine"), ("tokens_per_s", "jax"), ("speedup", "ratio"),
            ("step_ms", "engine"), ("mfu", "engine"), ("bubble", "engine"),
            ("peak_mem_bytes", "engine")}


def direction(side: str, metric: str) -> str | None:
    """'higher' / 'lower' is better, or None for rows that are not judged (theory, unknown)."""
    if side == "theory":
        return None
    if metric in HIGHER_IS_BETTER:
        return "higher"
    if metric in LOWER_IS_BETTER:
        return "lower"
    return None


def diff(base: pd.DataFrame, new: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Join two summaries (reports.load.summarize) on (label, side, metric).

    Columns: label, side, metric, unit, base, new, direction, better (after vs before as a
    factor > 1 = better, NaN when not judged), verdict (regression | improved | same | added |
    removed | None). Regression: better < 1 / threshold.
    """
    cols = KEY + ["value", "unit"]
    b = base[cols] if len(base) else pd.DataFrame(columns=cols)
    n = new[cols] if len(new) else pd.DataFrame(columns=cols)
    d = b.merge(n, on=KEY, how="outer", suffixes=("_b", "_n"), sort=False)
    d = d.rename(columns={"value_b": "base", "value_n": "new"})
    d["unit"] = d["unit_n"].where(d["unit_n"].notna(), d["unit_b"]).fillna("")
    d = d.drop(columns=["unit_b", "unit_n"])
    d["direction"] = [direction(s, m) for s, m in zip(d["side"], d["metric"])]
    better, verdict = [], []
    for bv, nv, dr in zip(d["base"], d["new"], d["direction"]):
        if not finite(bv) and finite(nv):
            better.append(math.nan), verdict.append("added")
            continue
        if finite(bv) and not finite(nv):
            better.append(math.nan), verdict.append("removed")
            continue
        if dr not in ("higher", "lower") or not finite(bv) or not finite(nv) or bv <= 0 or nv <= 0:
            better.append(math.nan), verdict.append(None)
            continue
        f = nv / bv if dr == "higher" else bv / nv
        better.append(f)
        verdict.append("regression" if f < 1.0 / threshold else
                       "improved" if f > threshold else "same")
    d["better"] = better
    d["verdict"] = verdict
    order = {m: i for i, m in enumerate(["tokens_per_s", "speedup", "step_ms", "mfu", "mfu_palm",
                                         "flops_per_s", "bubble", "peak_mem_bytes", "compile_s"])}
    labels = {lab: i for i, lab in enumerate(dict.fromkeys(
        list(base["label"] if len(base) else []) + list(new["label"] if len(new) else [])))}
    d["_o"] = [(labels.get(l, 1e9), order.get(m, 99), s) for l, m, s in
               zip(d["label"], d["metric"], d["side"])]
    return d.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def parity_changes(base: pd.DataFrame, new: pd.DataFrame) -> Table | None:
    """Tensors whose verdict changed between the runs (newly failing first)."""
    if base.empty or new.empty:
        return None
    k = ["label", "tier", "tensor"]
    m = base[k + ["share", "passed"]].merge(new[k + ["share", "passed"]], on=k,
                                            suffixes=("_b", "_n"))
    ch = m[m["passed_b"] != m["passed_n"]].sort_values("passed_n", kind="stable")
    if ch.empty:
        return None
    rows = [[r["label"], str(r["tier"]), str(r["tensor"]), tables.num(r["share_b"]),
             tables.num(r["share_n"]), "newly FAILING" if not r["passed_n"] else "fixed"]
            for _, r in ch.iterrows()]
    flags = ["bad" if not p else "good" for p in ch["passed_n"]]
    return Table("Parity changes", ["case", "tier", "tensor", "share before", "share after",
                                    "change"], rows, flags)


def compare(base_dir: Path, new_dir: Path, out: Path, threshold: float = 1.10) -> Path:
    """Compare two results directories and write OUT/index.html, report.md, compare.csv and
    figures/compare.png. Returns the path of index.html.

    `threshold` (> 1) is the factor by which a metric must get worse, in its bad direction,
    to count as a regression. Raises DataError for a missing or empty directory and
    ConfigError for a threshold ≤ 1.
    """
    if not (isinstance(threshold, (int, float)) and threshold > 1.0):
        raise ConfigError(f"--threshold must be a number > 1 (e.g. 1.10 = 10% worse), "
                          f"got {threshold!r}")
    base_dir, new_dir = Path(base_dir), Path(new_dir)
    b, n = load([base_dir]), load([new_dir])
    both = load([base_dir, new_dir])
    d = diff(summarize(b.records), summarize(n.records), threshold)
    out = prepare_out(Path(out))
    d.to_csv(out / "compare.csv", index=False)
    reg = d[d["verdict"] == "regression"]
    imp = d[d["verdict"] == "improved"]
    judged = d["verdict"].isin(["regression", "improved", "same"])

    sections = []
    s = Section("regressions", "Regressions",
                intro=f"Metrics worse by more than {threshold:g}× in their bad direction.")
    if d.empty:
        s.blocks.append(Note("no bench records (records.parquet) in one or both inputs: nothing "
                             "to compare.", "missing"))
    elif not judged.any():
        s.blocks.append(Note("no (case, side, metric) was measured in both runs: nothing could "
                             "be judged. Compare two runs of the same suite.", "warn"))
    elif reg.empty:
        s.blocks.append(Note(f"none: no judged metric got worse by more than {threshold:g}×."))
    else:
        t = tables.compare(reg, threshold)
        t.title = f"{len(reg)} regression(s)"
        s.blocks.append(t)
    sections.append(s)
    s = Section("changes", "Before / after")
    if len(d):
        p = figures.compare_ratios(d, out / FIG_DIR / "compare.png", threshold)
        if p:
            s.blocks.append(Figure(f"{FIG_DIR}/{p.name}", "Change per case",
                                   "Factor after vs before in each metric's good direction "
                                   "(tokens/s and MFU: after ÷ before; step time and memory: "
                                   "before ÷ after), so right is better everywhere; dotted lines "
                                   f"at ±{threshold:g}× mark the regression threshold."))
        head = d[[(m, sd) in HEADLINE for m, sd in zip(d["metric"], d["side"])]]
        s.blocks.append(tables.compare(head, threshold, "Headline metrics"))
        s.blocks.append(Note("JAX rows are the control: a JAX change of the same size as the "
                             "engine's points at the machine, not the commit."))
    else:
        s.blocks.append(Note("no bench records to compare.", "missing"))
    sections.append(s)
    s = Section("parity", "Parity changes")
    pc = parity_changes(b.parity, n.parity)
    if pc is not None:
        s.blocks.append(pc)
    elif b.parity.empty or n.parity.empty:
        s.blocks.append(Note("parity records missing in one or both inputs.", "missing"))
    else:
        s.blocks.append(Note("no tensor changed verdict between the runs."))
    sections.append(s)
    sections.append(Section("environment", "Environment", [tables.environment(both)]))
    if len(d):
        every = tables.compare(d, threshold, "Every (case, side, metric)")
        sections.append(Section("all", "All metrics", [every]))

    cards = [Card(str(len(reg)), f"regression(s) beyond {threshold:g}×", "bad" if len(reg) else
                  "good"),
             Card(str(len(imp)), f"improvement(s) beyond {threshold:g}×"),
             Card(str(int(judged.sum()) - len(reg) - len(imp)), "metrics within the threshold")]
    if pc is not None:
        newly = sum(1 for r in pc.rows if r[-1] == "newly FAILING")
        cards.append(Card(str(newly), "parity tensor(s) newly failing", "bad" if newly else ""))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = Document("Tandem compare", [f"Before: {base_dir}", f"After: {new_dir}",
                                      f"Generated {stamp}; threshold {threshold:g}×"],
                   cards, sections)
    return write(doc, out)


def count_regressions(out: Path) -> int:
    """Regressions recorded in OUT/compare.csv by `compare` (for the CLI's exit status)."""
    p = Path(out) / "compare.csv"
    if not p.exists():
        return 0
    return int((pd.read_csv(p)["verdict"] == "regression").sum())
