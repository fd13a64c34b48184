"""`build_report`: results directories -> OUT/index.html, OUT/report.md, OUT/figures/*.png.

What it is: the assembly of the report — which figures and tables go in which section, their
captions, the headline cards, the notes saying which data is absent, and the copies of the
Perfetto traces into OUT/traces/. What it is not: drawing (figures.py), table layout
(tables.py), loading (load.py) or rendering (doc.py); it never modifies an input directory.
"""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from reports import figures, tables
from reports.doc import Card, Document, Figure, Links, Note, Section, write
from reports.load import Results, finite, load, percent, pick, summarize
from reports.simulate import section as simulate_section

FIG_DIR = "figures"
TRACE_DIR = "traces"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "case"


def prepare_out(out: Path) -> Path:
    """Create OUT and empty OUT/figures (ours: stale figures of an earlier report must not stay
    referenced-looking on disk). Nothing else under OUT is removed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / FIG_DIR, ignore_errors=True)
    (out / FIG_DIR).mkdir()
    return out


def copy_traces(res: Results, out: Path) -> list[tuple[str, str]]:
    """Copy traces/*.json of every input into OUT/traces/; returns (relative href, text)."""
    if not res.traces:
        return []
    dest_dir = out / TRACE_DIR
    dest_dir.mkdir(exist_ok=True)
    names = [p.name for _, p in res.traces]
    links = []
    for (src, p), name in zip(res.traces, names):
        if names.count(name) > 1:
            name = f"{slug(src)}__{name}"
        dest = dest_dir / name
        if not (dest.exists() and dest.samefile(p)):
            shutil.copy2(p, dest)
        text = f"{name}  ({src})" if len(res.runs) > 1 else name
        links.append((f"{TRACE_DIR}/{name}", text))
    return links


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


MAX_VERDICT_CARDS = 6


def _verdict(row) -> str:
    """'<case>: engine faster, 1.24× JAX (25–75%: 1.24–1.25)' from a speedup summary row."""
    v = float(row["value"])
    who = "engine faster" if v >= 1 else "JAX faster"
    lo, hi = row.get("spread_lo"), row.get("spread_hi")
    spread = (f" (25–75%: {lo:.2f}–{hi:.2f})" if lo is not None and hi is not None
              and np.isfinite(lo) and np.isfinite(hi) else "")
    return f"{row['label']}: {who}, engine ÷ JAX tokens/s {v:.2f}×{spread}"


def _cards(summary: pd.DataFrame, res: Results) -> list[Card]:
    cards = []
    sp = pick(summary, "speedup", "ratio")
    # one verdict per case: a median across unlike cases (one stage and pipelined, small and
    # large) would say nothing about any of them
    for _, row in sp.head(MAX_VERDICT_CARDS).iterrows():
        cards.append(Card(f"{row['value']:.2f}×", _verdict(row),
                          "good" if row["value"] >= 1 else "bad"))
    if len(sp) > MAX_VERDICT_CARDS:
        rest = sp.iloc[MAX_VERDICT_CARDS:]
        won = int((rest["value"] >= 1).sum())
        cards.append(Card(f"+{len(rest)}", f"more case(s) in the table below: the engine faster "
                          f"in {won}, JAX in {len(rest) - won}"))
    tps = pick(summary, "tokens_per_s", "engine")
    if len(tps):
        best = tps.loc[tps["value"].idxmax()]
        cards.append(Card(tables.si(best["value"]), f"best engine tokens/s ({best['label']})"))
    mf = pick(summary, "mfu", "engine")
    if len(mf):
        v = percent(mf["value"], mf["unit"])
        i = v.idxmax()
        cards.append(Card(f"{v[i]:.1f}%", f"best engine MFU ({mf.loc[i, 'label']})"))
    if len(res.parity):
        ok, n = int(res.parity["passed"].sum()), len(res.parity)
        cases = res.parity.groupby("label")["passed"].all()
        cards.append(Card(f"{ok}/{n}", f"parity tensors within tolerance; {int((~cases).sum())} of "
                          f"{len(cases)} case(s) failing", "bad" if ok < n else "good"))
    return cards


def _memory_notes(res: Results) -> list[str]:
    """One line per case where a side ran out of memory (a result, from run.json): what it
    asked for, and the baselines measured instead (each its own side in the tables)."""
    out = []
    for source, run in res.runs.items():
        cases = run.get("cases")
        if not isinstance(cases, dict):  # parity's run.json lists case names; bench's maps them
            continue
        for case, info in cases.items():
            lines = [f"engine: {a['message']}" for a in info.get("engine_attempts", [])
                     if a.get("status") == "oom"]
            lines += [f"JAX {a['variant']}: {a['message']}" for a in info.get("jax_attempts", [])
                      if a.get("status") == "oom"]
            if not lines:
                continue
            ok = [f"{a['variant']} ({a.get('baseline')})" for a in info.get("jax_attempts", [])
                  if a.get("status") == "ok"]
            tail = (f" Measured instead: JAX {', '.join(ok)}." if ok else
                    " No JAX variant fit: no JAX rows.")
            if info.get("engine_baseline"):
                tail += f" Engine: {info['engine_baseline']}."
            label = case if len(res.runs) == 1 else f"{source}:{case}"
            out.append(f"{label}: out of memory is a result here. " + "; ".join(lines) + "." + tail)
    return out


def _bench_section(summary: pd.DataFrame, res: Results, fig: Path, out: Path) -> Section:
    s = Section("bench", "Performance: engine vs JAX",
                intro="Throughput, speedup and MFU per case, medians over timed repeats.")
    if summary.empty:
        s.blocks.append(Note("no bench records (records.parquet) in the inputs: no throughput, "
                             "speedup, MFU, scaling or bubble figures.", "missing"))
        return s
    s.blocks += tables.bench(summary)
    for text in _memory_notes(res):
        s.blocks.append(Note(text, "warn"))
    p = figures.speedup(summary, fig / "speedup.png")
    if p:
        derived = pick(summary, "speedup", "ratio")["derived"].any()
        s.blocks.append(Figure(_rel(p, out), "Speedup",
                               "Bars: median of engine ÷ JAX tokens/s, both measured in the "
                               "same run; whiskers: 25th–75th percentile over repeats; dashed "
                               "line: equal speed. Blue: engine faster, orange: JAX faster."
                               + (" Cases without a stored ratio row use the ratio of the two "
                                  "medians (no whiskers)." if derived else "")))
    else:
        s.blocks.append(Note("no speedup: no case has both engine and JAX tokens/s.", "missing"))
    p = figures.throughput(summary, fig / "throughput.png")
    if p:
        s.blocks.append(Figure(_rel(p, out), "Throughput",
                               "Median training tokens/s per case for each side; whiskers "
                               "25th–75th percentile. The axis turns logarithmic when cases span "
                               "more than 30×."))
    else:
        s.blocks.append(Note("no tokens_per_s rows for engine or JAX.", "missing"))
    p = figures.mfu(summary, fig / "mfu.png")
    if p:
        peaks = tables.peaks_used(res.records)
        peaks = "not recorded on the rows" if peaks == tables.DASH else peaks
        s.blocks.append(Figure(_rel(p, out), "MFU",
                               "Model FLOPs utilisation = (6·N + 6·L·T·C) FLOPs per token × "
                               f"tokens/s ÷ peak. Peak used: {peaks}. The PaLM variant "
                               "(6·N + 12·L·T·C) is in the records as mfu_palm."))
    else:
        s.blocks.append(Note("no MFU rows (metric mfu) for engine or JAX.", "missing"))
    return s


def _scaling_section(summary: pd.DataFrame, fig: Path, out: Path) -> Section:
    s = Section("scaling", "Scaling",
                intro="Tokens/s as one setting varies and the rest of the case stays fixed; "
                      "log2 x axis, median line, 25–75% band over repeats.")
    what = {"stages": ("scaling_stages.png", "Scaling with pipeline stages",
                       "Dotted: ideal linear scaling from the smallest stage count (engine)."),
            "microbatches": ("scaling_microbatches.png", "Scaling with micro-batches",
                             "More micro-batches per step shrink the bubble ((p−1)/(m+p−1)) "
                             "but each one is smaller."),
            "model_params": ("scaling_model_size.png", "Scaling with model size",
                             "N = parameters excluding position embeddings, from n_layer, n_embd "
                             "and vocab_size (the N of 6·N + 6·L·T·C).")}
    for var, (name, title, extra) in what.items():
        p = figures.scaling(summary, var, fig / name) if len(summary) else None
        if p:
            s.blocks.append(Figure(_rel(p, out), title,
                                   "One panel per sweep (cases identical but for this setting). "
                                   + extra))
        else:
            label = {"stages": "pipeline stages", "microbatches": "micro-batches",
                     "model_params": "model size"}[var]
            s.blocks.append(Note(f"no sweep over {label}: no group of cases differs only in "
                                 f"{label}.", "missing"))
    return s


def _timeline_bubble(rows: pd.DataFrame) -> float:
    step = rows[rows["step"] == rows["step"].max()]
    busy = step[step["kind"].isin(["F", "B", "W", "BW"])]
    wall = (step["end_us"].max() - step["start_us"].min())
    ranks = step["rank"].nunique()
    if wall <= 0 or ranks == 0:
        return float("nan")
    return 1.0 - (busy["end_us"] - busy["start_us"]).sum() / (ranks * wall)


def _pipeline_section(summary: pd.DataFrame, res: Results, fig: Path, out: Path) -> Section:
    s = Section("pipeline", "Pipeline: bubble and timelines",
                intro="Where the pipelined engine spends a step: measured against theoretical "
                      "bubble, and the per-rank timeline of one step.")
    p = figures.bubble(summary, fig / "bubble.png") if len(summary) else None
    if p:
        s.blocks.append(Figure(_rel(p, out), "Bubble per schedule",
                               "Measured = 1 − Σ busy compute ÷ (ranks × step wall time) from the "
                               "engine's timelines (median over repeats, whiskers 25–75%); "
                               "simulated = the schedule replayed by the event simulator with the "
                               "job's own mean F/B/W durations per stage (the gap to measured is "
                               "what the runtime adds); theory = equal stage times (GPipe/1F1B: "
                               "(p−1)/(m+p−1) of the step). Grouped by schedule."))
    else:
        s.blocks.append(Note("no bubble rows (metric bubble, side engine or theory).", "missing"))
    per_rank = tables.rank_bubbles(res.runs)
    if per_rank is not None:
        s.blocks.append(per_rank)
    if not res.timelines:
        s.blocks.append(Note("no timelines (timelines/<case>/timeline_rank*.csv): no pipeline "
                             "Gantt charts.", "missing"))
    for label, rows in res.timelines.items():
        meta = summary[summary["label"] == label] if len(summary) else pd.DataFrame()
        sub = ""
        if len(meta):
            r = meta.iloc[0]
            sub = f"{r['schedule']}, p={r['stages']}, m={r['microbatches']}"
        b = _timeline_bubble(rows)
        if finite(b):
            sub += ("; " if sub else "") + f"bubble in this step {100 * b:.1f}%"
        p = figures.timeline(rows, label, fig / f"timeline_{slug(label)}.png", sub)
        if p:
            step = int(rows["step"].max())
            s.blocks.append(Figure(
                _rel(p, out), f"Timeline — {label}",
                f"Last recorded step ({step}); one row per rank, time in ms from the step's "
                "first event. Bars: F forward, B input-gradient, W weight-gradient, BW fused "
                "backward (number = micro-batch); thin strip: send/recv; hatched: waiting "
                "(bubble); the bubble in the subtitle counts F/B/W/BW as busy."))
    links = copy_traces(res, out)
    if links:
        s.blocks.append(Links(links, "Full traces (copied next to this report): open them in "
                                     "ui.perfetto.dev (Open trace file; the file stays on your "
                                     "machine) or chrome://tracing."))
    else:
        s.blocks.append(Note("no Perfetto traces (traces/*.json) in the inputs.", "missing"))
    return s


def _parity_section(res: Results, fig: Path, out: Path) -> Section:
    s = Section("parity", "Parity: engine vs JAX, tensor by tensor",
                intro="Every compared tensor's error as a share of its tolerance; a share above 1 "
                      "fails.")
    if res.parity.empty:
        s.blocks.append(Note("no parity records (parity.parquet) in the inputs.", "missing"))
        return s
    s.blocks.append(tables.parity_cases(res.parity))
    fails = tables.parity_failures(res.parity)
    if fails is not None:
        s.blocks.append(fails)
    p = figures.parity(res.parity, fig / "parity.png")
    if p:
        groups = ", ".join(dict.fromkeys(res.parity["group"]))
        s.blocks.append(Figure(_rel(p, out), "Parity by tensor group",
                               "Worst share of tolerance in each group over all cases and tiers, "
                               "labelled with the worst tensor; log axis, dashed line = the "
                               f"tolerance. Groups present: {groups}."))
    return s


def _loss_section(res: Results, fig: Path, out: Path) -> Section:
    s = Section("losses", "Training: loss curves",
                intro="Engine and JAX loss per optimizer step for the trajectory cases, from the "
                      "same weights and tokens.")
    if res.losses.empty:
        s.blocks.append(Note("no loss curves (losses.parquet) in the inputs.", "missing"))
        return s
    p = figures.losses(res.losses, fig / "losses.png")
    facts = []
    for lab, g in res.losses.groupby("label", sort=False):
        e = g[g["side"] == "engine"].sort_values("step")
        j = g[g["side"] == "jax"].sort_values("step").set_index("step")["loss"]
        if len(e):
            fact = (f"{lab}: engine loss {e['loss'].iloc[0]:.3f} → {e['loss'].iloc[-1]:.3f} over "
                    f"{len(e)} steps")
            both = e.set_index("step")["loss"].align(j, join="inner")
            if len(both[0]):
                rel = ((both[0] - both[1]).abs() / both[1].abs()).max()
                fact += f", max |Δ| ÷ |JAX| {rel:.1e}"
            facts.append(fact)
    if p:
        s.blocks.append(Figure(_rel(p, out), "Loss curves",
                               "Upper panels: loss (nats/token), engine solid, JAX dashed; lower "
                               "panels: relative difference per step. " + "; ".join(facts) + "."))
    return s


def build_report(dirs: list[Path], out: Path) -> Path:
    """Render results directories into OUT/index.html (+ report.md, figures/, traces/).

    Raises harness.errors.DataError when a directory is missing, holds no results or holds a
    malformed table. Returns the path of index.html. Inputs are only read.
    """
    res = load([Path(d) for d in dirs])
    out = prepare_out(Path(out))
    fig = out / FIG_DIR
    summary = summarize(res.records)
    sections = [
        Section("environment", "Environment", [tables.environment(res)]),
        _bench_section(summary, res, fig, out),
        _scaling_section(summary, fig, out),
        _pipeline_section(summary, res, fig, out),
        _parity_section(res, fig, out),
        _loss_section(res, fig, out),
    ]
    sim = simulate_section(res.dirs, fig, out)  # directories `tandem simulate --out` wrote
    if sim:
        sections.append(sim)
    commits = sorted({str(r.get("commit")) for r in res.runs.values() if r.get("commit")})
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = [f"Generated {stamp} from {', '.join(str(d) for d in res.dirs)}"]
    if commits:
        subtitle.append("Commit " + ", ".join(commits))
    doc = Document("Tandem report", subtitle, _cards(summary, res), sections)
    return write(doc, out)
