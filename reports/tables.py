"""The report's tables, built as reports.doc.Table (rendered to both HTML and Markdown).

What it is: the choice of rows and columns and the number formatting (units in headers, "—"
for absent values) for the environment, bench, parity and before/after tables.
What it is not: where medians, verdicts or regressions are computed (load.py, compare.py).
"""

from __future__ import annotations

import math

import pandas as pd

from reports.doc import Table
from reports.load import Results, case_order, finite, mib, percent

DASH = "—"
FLOPS_FORMULA = ("FLOPs per token (training, forward + backward) = 6·N + 6·L·T·C, N = "
                 "parameters excluding position embeddings (the tied LM-head matmul counts), "
                 "attention counted causally; PaLM variant (mfu_palm) = 6·N + 12·L·T·C. "
                 "MFU = FLOPs per token × tokens/s ÷ peak FLOP/s.")


# --- formatting --------------------------------------------------------------------------------

def si(x, unit: str = "") -> str:
    """1.234e5 -> '123k', (9.89e14, 'FLOP/s') -> '989 TFLOP/s'; 3 significant digits."""
    if not finite(x):
        return DASH
    x = float(x)
    sep = " " if unit else ""
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{sep}{suf}{unit}"
    return f"{x:.3g}{sep}{unit}"


def num(x, digits: int = 3) -> str:
    """Plain number: thousands separators from 10^digits up, scientific below 1e-3."""
    if not finite(x):
        return DASH
    x = float(x)
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def pct(x, digits: int = 1) -> str:
    return f"{float(x):.{digits}f}%" if finite(x) else DASH


def flops(x) -> str:
    return si(x, "FLOP/s") if finite(x) else DASH


def _flat(v) -> str:
    """A run.json value as one line: dicts as 'k: v; …', lists comma-joined, FLOP/s humanised."""
    if isinstance(v, dict):
        return "; ".join(f"{k}: {flops(x) if 'flop' in str(k).lower() and finite(x) else _flat(x)}"
                         for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v) if all(isinstance(x, str) for x in v) else \
            ", ".join(_flat(x) for x in v)
    if isinstance(v, float) and abs(v) >= 1e6:
        return si(v)
    return str(v)


# --- tables ------------------------------------------------------------------------------------

ENV_FIELDS = [("machine", "machine"), ("cpu", "CPU"), ("gpu", "GPU"), ("versions", "versions"),
              ("commit", "commit"), ("peaks", "peaks (run.json)"), ("command", "command"),
              ("timestamp", "timestamp")]


# the raw env keys each summary field is made of
ENV_COVERS = {"machine": ("hostname", "platform"), "cpu": ("cpu_model", "cpu_count"),
              "gpu": ("gpu_name",), "versions": ("python", "numpy", "jax", "jaxlib", "engine")}

# run.json keys whose values are method descriptions or per-case notes: long prose that belongs
# in run.json itself, not in a table row (the table links the file instead)
ENV_SKIP = {"bench", "cases", "tolerances", "env_vars", "argv"}
ENV_MAX_CHARS = 160


def _env_view(run: dict) -> dict:
    """The table's view of one run.json: top-level scalars plus the scalars of a nested "env"
    (bench nests the machine description there, parity keeps it flat)."""
    view = {k: v for k, v in run.items() if k not in ENV_SKIP}
    nested = view.pop("env", None)
    if isinstance(nested, dict):
        for k, v in nested.items():
            view.setdefault(k, v)
    return view


def environment(res: Results) -> Table:
    """One column per results directory: run.json fields, the peaks MFU rows divided by (with
    their source) and the FLOPs-per-token formula. Long or nested values (method notes, per-case
    notes) stay in run.json, which the report links."""
    sources = res.sources
    views = {s: _env_view(res.runs[s]) for s in sources}
    rows: list[list[str]] = []
    known = {k for k, _ in ENV_FIELDS}
    for key, name in ENV_FIELDS:
        vals = [_flat(views[s].get(key)) if views[s].get(key) not in (None, "", {}) else DASH
                for s in sources]
        if any(v != DASH for v in vals):
            rows.append([name] + vals)
    # raw env keys that a summary row above already shows (bench's run.json has both)
    shown = {k for field, keys in ENV_COVERS.items()
             if any(views[s].get(field) for s in sources) for k in keys}
    extra = sorted({k for s in sources for k, v in views[s].items()
                    if k not in known and k not in shown
                    and not isinstance(v, (dict, list, tuple))
                    and len(str(v)) <= ENV_MAX_CHARS and v not in (None, "")})
    for key in extra:
        rows.append([key] + [_flat(views[s][key]) if views[s].get(key) not in (None, "") else DASH
                             for s in sources])
    rows.append(["run.json (everything)"] + [f"{s}/run.json" if res.runs[s] else DASH
                                             for s in sources])
    rows.append(["peak used for MFU (records)"] +
                [peaks_used(res.records[res.records["source"] == s]) if len(res.records) else DASH
                 for s in sources])
    waits = [_omp_wait(res.runs[s]) for s in sources]
    if any(w != DASH for w in waits):
        rows.append(["engine OpenMP wait (in-process cases)"] + waits)
    if any(not res.runs[s] for s in sources):
        rows.append(["run.json"] + ["missing" if not res.runs[s] else "present" for s in sources])
    # the formula once is enough
    rows.append(["FLOPs per token", FLOPS_FORMULA] + [""] * (len(sources) - 1))
    return Table("", ["", *sources], rows, numeric=[False] * (len(sources) + 1))


def _omp_wait(run: dict) -> str:
    """How the in-process engine's OpenMP threads waited between parallel regions (bench's
    cases.<case>.engine.omp_wait, chosen when libgomp loaded): a short spin or none changes a
    small model's step by up to ~1.7x on a shared CPU, so the report says which it was."""
    seen: list[str] = []
    cases = run.get("cases")
    for entry in (cases.values() if isinstance(cases, dict) else []):
        w = (entry.get("engine") or {}).get("omp_wait") if isinstance(entry, dict) else None
        if not isinstance(w, dict) or not w:
            continue
        spin = w.get("GOMP_SPINCOUNT")
        text = (f"OMP_WAIT_POLICY={w.get('OMP_WAIT_POLICY') or 'unset'}, "
                f"GOMP_SPINCOUNT={spin if spin else 'unset (no spin)'}")
        if w.get("libgomp_preloaded"):
            text += " (libgomp loaded before the harness chose)"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) if seen else DASH


def peaks_used(records: pd.DataFrame) -> str:
    """The peak FLOP/s the MFU rows divided by, per source. Pipelined rows divide by the
    per-device peak × ranks; those multiples are folded into one entry."""
    if records.empty:
        return DASH
    m = records[records["metric"].isin(["mfu", "mfu_palm"]) & records["peak_flops"].notna()]
    out = []
    for src, g in m.groupby(m["peak_source"].fillna(""), sort=False):
        vals = sorted(g["peak_flops"].unique())
        base = vals[0]
        ks = [v / base for v in vals]
        text = f"{flops(base)}"
        if len(vals) > 1 and all(abs(k - round(k)) < 1e-6 for k in ks):
            text += f" per device (× {', '.join(f'{k:g}' for k in ks[1:])} on multi-rank cases)"
        elif len(vals) > 1:
            text = ", ".join(flops(v) for v in vals)
        dev = ", ".join(dict.fromkeys(f"{d} {t}".strip() for d, t in zip(g["device"], g["dtype"])))
        out.append(f"{text} — {src or 'source not recorded'}" + (f" ({dev})" if dev else ""))
    return "; ".join(out) or DASH


def _config(r) -> str:
    """'L48 C1600 T1024 B32 · 1f1b p4 m8' (model, tokens per step, pipeline)."""
    bits = []
    model = []
    if r.get("n_layer"):
        model.append(f"L{r['n_layer']} C{r['n_embd']}")
    if r.get("seq_len"):
        model.append(f"T{r['seq_len']} B{r['batch_size']}")
    if model:
        bits.append(" ".join(model))
    if r.get("stages", 1) and (r.get("stages", 1) > 1 or r.get("schedule") not in ("none", "")):
        v = f" v{r['chunks']}" if r.get("chunks", 1) and r["chunks"] > 1 else ""
        bits.append(f"{r['schedule']} p{r['stages']} m{r['microbatches']}{v}")
    return " · ".join(bits) or DASH


def bench(summary: pd.DataFrame) -> list[Table]:
    """Two tables, one row per case each: (1) medians of tokens/s, speedup with its 25–75%
    spread, MFU and step time for engine and JAX; (2) measured and theoretical bubble, peak
    memory in MiB and compile time."""
    labels = case_order(summary)
    idx = summary.set_index(["label", "side", "metric"])

    def get(lab, side, metric):
        key = (lab, side, metric)
        return idx.loc[key] if key in idx.index else None

    def val(lab, side, metric, fmt):
        row = get(lab, side, metric)
        if row is None:
            return DASH
        if isinstance(row, pd.DataFrame):
            row = row.iloc[-1]
        v = row["value"]
        if metric in ("mfu", "mfu_palm", "bubble", "bubble_sim"):
            v = percent(pd.Series([v]), pd.Series([row["unit"]])).iloc[0]
        if metric == "peak_mem_bytes":
            v = mib(pd.Series([v]), pd.Series([row["unit"]])).iloc[0]
        return fmt(v)

    def speed(lab):
        row = get(lab, "ratio", "speedup")
        if row is None:
            return DASH
        if isinstance(row, pd.DataFrame):
            row = row.iloc[-1]
        s = f"{row['value']:.2f}×"
        if finite(row["spread_lo"]) and finite(row["spread_hi"]):
            s += f" ({row['spread_lo']:.2f}–{row['spread_hi']:.2f})"
        elif row.get("derived", False):
            s += " (from medians)"
        return s

    perf, pipe = [], []
    for lab in labels:
        first = summary[summary["label"] == lab].iloc[0]
        n = summary.loc[summary["label"] == lab, "n"].max()
        perf.append([
            lab, _config(first),
            val(lab, "engine", "tokens_per_s", si), val(lab, "jax", "tokens_per_s", si),
            speed(lab),
            val(lab, "engine", "mfu", pct), val(lab, "jax", "mfu", pct),
            val(lab, "engine", "step_ms", num), val(lab, "jax", "step_ms", num),
        ])
        dev = " ".join(str(first.get(k) or "") for k in ("device", "dtype")).strip() or DASH
        pipe.append([
            lab, dev, val(lab, "engine", "bubble", pct), val(lab, "theory", "bubble_sim", pct),
            val(lab, "theory", "bubble", pct),
            val(lab, "engine", "peak_mem_bytes", lambda v: f"{v:,.0f}"),
            val(lab, "jax", "peak_mem_bytes", lambda v: f"{v:,.0f}"),
            val(lab, "engine", "compile_s", num), val(lab, "jax", "compile_s", num),
            str(int(n)) if n else DASH,
        ])
    cols = ["case", "config", "tokens/s engine", "tokens/s JAX", "speedup (25–75%)",
            "MFU engine", "MFU JAX", "step ms engine", "step ms JAX"]
    note = ("Medians over timed repeats (warm-up excluded); speedup = engine ÷ JAX tokens/s "
            "measured in the same run, in brackets its 25th–75th percentile. Config: L layers, "
            "C width, T sequence, B sequences per step; schedule, p stages, m micro-batches, "
            "v chunks per rank.")
    t1 = Table("Throughput per case", cols, perf, [], note, [False, False] + [True] * 7,
               nowrap=True)
    cols = ["case", "device", "bubble measured", "bubble simulated", "bubble theory",
            "peak MiB engine", "peak MiB JAX", "compile s engine", "compile s JAX", "repeats"]
    note = ("Bubble = 1 − busy compute ÷ (ranks × step wall time), measured from the engine's "
            "timelines; simulated: the schedule replayed by the event simulator with the job's "
            "own mean F/B/W durations per stage (no communication cost), so measured − "
            "simulated is what the runtime adds to the schedule; theory: the closed form with "
            "equal stage times. Peak memory per device; compile time (JAX jit, engine setup) "
            "excluded from every other column.")
    t2 = Table("Bubble, memory and compile time per case", cols, pipe, [], note,
               [False, False] + [True] * 8, nowrap=True)
    return [t1, t2]


def rank_bubbles(runs: dict[str, dict]) -> Table | None:
    """One row per (case, rank) of the pipelined cases whose run.json carries the last job's
    bubble rank by rank (engine.rank_bubble): measured and simulated idle share, the gap in
    points, and the rank's device memory where the run has it (engine.rank_device_bytes). None
    when no case has them."""
    rows = []
    for _source, run in runs.items():
        cases = run.get("cases")
        if not isinstance(cases, dict):  # a parity run lists its cases
            continue
        for case, info in cases.items():
            eng = info.get("engine") if isinstance(info, dict) else None
            rb = (eng.get("rank_bubble") if isinstance(eng, dict) else None) or {}
            mem = (eng.get("rank_device_bytes") if isinstance(eng, dict) else None) or {}
            for r, v in sorted(rb.items(), key=lambda kv: str(kv[0]).zfill(8)):
                try:
                    m, sm = float(v["measured"]), float(v["simulated"])
                except (KeyError, TypeError, ValueError):
                    continue  # not what the bench writes: leave the row out
                try:
                    dev = f"{float(mem[str(r)]) / 2**20:,.0f}"
                except (KeyError, TypeError, ValueError):
                    dev = "—"  # CPU ranks: no device counter
                rows.append([case, str(r), f"{100 * m:.1f}%", f"{100 * sm:.1f}%",
                             f"{100 * (m - sm):+.1f}", dev])
    if not rows:
        return None
    note = ("The last timed job of each case: a rank's idle share of the step (1 − its busy "
            "compute ÷ the step's wall time), measured from its timeline and simulated by "
            "replaying the schedule with the job's own per-stage F/B/W durations; the mean "
            "over the ranks is the case's bubble. Device memory: what the engine allocated on "
            "the rank's GPU (its own counter, engine.rank_device_bytes), for GPU ranks.")
    return Table("Bubble per rank", ["case", "rank", "measured", "simulated",
                                     "measured − simulated (points)", "device memory (MiB)"],
                 rows, [], note, [False, True, True, True, True, True], nowrap=True)


def parity_cases(parity: pd.DataFrame) -> Table:
    """One row per case: tiers run, tensors passed/failed, the worst tensor and its share."""
    rows, flags = [], []
    for lab, g in parity.groupby("label", sort=False):
        w = g.loc[g["share"].idxmax()] if g["share"].notna().any() else g.iloc[0]
        failed = int((~g["passed"]).sum())
        rows.append([lab, ", ".join(dict.fromkeys(g["tier"].astype(str))),
                     ", ".join(dict.fromkeys(g["reference"].astype(str))),
                     ", ".join(dict.fromkeys(g["dtype"].astype(str))), str(len(g)),
                     str(int(g["passed"].sum())), str(failed), str(w["tensor"]),
                     num(w["share"]), "FAIL" if failed else "pass"])
        flags.append("bad" if failed else "")
    cols = ["case", "tiers", "against", "dtype", "tensors", "passed", "failed", "worst tensor",
            "worst share", "verdict"]
    note = "share = error ÷ tolerance for the tensor's metric (rel_l2 or rel); > 1 fails."
    return Table("Parity summary per case", cols, rows, flags, note)


def parity_failures(parity: pd.DataFrame) -> Table | None:
    f = parity[~parity["passed"]].sort_values("share", ascending=False)
    if f.empty:
        return None
    rows = [[r["label"], str(r["tier"]), str(r["tensor"]), str(r["metric"] or ""),
             num(r["max_abs"]), num(r["rel_l2"]), num(r["rel"]), num(r["tol"]), num(r["share"])]
            for _, r in f.iterrows()]
    cols = ["case", "tier", "tensor", "metric", "max abs", "rel L2", "rel", "tol", "share"]
    return Table("Failing tensors", cols, rows, ["bad"] * len(rows))


METRIC_UNIT = {"tokens_per_s": "tokens/s", "step_ms": "ms", "flops_per_s": "FLOP/s",
               "mfu": "%", "mfu_palm": "%", "bubble": "%", "peak_mem_bytes": "MiB",
               "compile_s": "s", "speedup": "×"}


def _cmp_value(metric: str, v: float, unit: str) -> str:
    if not finite(v):
        return DASH
    if metric in ("mfu", "mfu_palm", "bubble"):
        return pct(percent(pd.Series([v]), pd.Series([unit])).iloc[0])
    if metric == "peak_mem_bytes":
        return f"{mib(pd.Series([v]), pd.Series([unit])).iloc[0]:,.0f} MiB"
    if metric == "speedup":
        return f"{v:.3f}×"
    if metric == "flops_per_s":
        return flops(v)
    return f"{si(v)} {METRIC_UNIT.get(metric, unit)}".strip()


def compare(diff: pd.DataFrame, threshold: float, title: str = "Before / after") -> Table:
    """Before/after per (case, side, metric) with the ratio after ÷ before and a verdict;
    regressions (worse by more than `threshold` in the metric's bad direction) flagged."""
    rows, flags = [], []
    for _, r in diff.iterrows():
        ratio = r["new"] / r["base"] if finite(r["base"]) and r["base"] != 0 and finite(r["new"]) \
            else math.nan
        v = r["verdict"] if isinstance(r["verdict"], str) else ""  # None/NaN: not judged
        verdict = {"regression": "REGRESSION", "improved": "improved", "same": "ok",
                   "added": "new in after", "removed": "only in before"}.get(v, v)
        direction = {"higher": "↑ better", "lower": "↓ better"}.get(r["direction"], "not judged")
        rows.append([r["label"], r["side"], r["metric"], direction,
                     _cmp_value(r["metric"], r["base"], r["unit"]),
                     _cmp_value(r["metric"], r["new"], r["unit"]),
                     f"{ratio:.3f}" if finite(ratio) else DASH, verdict])
        flags.append("bad" if r["verdict"] == "regression" else
                     "good" if r["verdict"] == "improved" else "")
    cols = ["case", "side", "metric", "direction", "before", "after", "after ÷ before", "verdict"]
    note = (f"Regression: worse by more than {threshold:g}× in the metric's bad direction "
            "(tokens/s, FLOP/s, MFU, speedup lower; step time, bubble, memory, compile time "
            "higher). Medians; 'theory' rows are not judged.")
    return Table(title, cols, rows, flags, note)
