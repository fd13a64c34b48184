"""One function per report figure, all drawn under one seaborn theme and one palette (below).

What it is: matplotlib/seaborn drawing from the tidy frames of reports.load, one PNG per call
(Agg backend, no display). Every function returns the path it wrote, or None when its data is
absent, so the builder can say what is missing. What it is not: data loading, captions or
tables; and it never decides pass/fail — it only draws the verdicts it is given.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import (EngFormatter, FixedLocator, FuncFormatter, LogLocator,  # noqa: E402
                               MaxNLocator, NullFormatter, NullLocator)

from reports.load import CONFIG_COLUMNS, case_order, percent, pick  # noqa: E402

# --- the one theme -----------------------------------------------------------------------------
THEME = dict(context="notebook", style="whitegrid", palette="colorblind", font_scale=0.85,
             rc={"axes.titleweight": "bold", "axes.titlesize": 12, "figure.titlesize": 13,
                 "figure.titleweight": "bold", "legend.frameon": False, "axes.spines.top": False,
                 "axes.spines.right": False, "grid.color": "#e3e6ea", "savefig.facecolor": "white"})
_C = sns.color_palette("colorblind")
SIDE = {"engine": _C[0], "jax": _C[1], "theory": "#9aa0a6", "ratio": _C[0], "simulated": _C[4]}
SIDE_NAME = {"engine": "engine (Tandem)", "jax": "JAX", "theory": "theory (equal stages)",
             "measured": "measured (engine)", "simulated": "simulated (the job's F/B/W)"}
VERDICT = {"fail": _C[3], "pass": _C[2], "regression": _C[3], "improved": _C[2], "same": "#9aa0a6"}
# Timeline kinds: compute fills the row, communication is a thin strip under it, waiting is
# hatched (it is the bubble), optimizer and all-reduce fill the row in their own colours.
KIND = {"F": _C[0], "B": _C[1], "W": _C[2], "BW": _C[8], "OPT": _C[4], "ALLREDUCE": _C[6],
        "SEND": "#5f6368", "RECV": "#9aa0a6", "WAIT": "#eceff1"}
KIND_NAME = {"F": "F forward", "B": "B input-grad", "W": "W weight-grad", "BW": "BW fused backward",
             "OPT": "optimizer", "ALLREDUCE": "all-reduce", "SEND": "send", "RECV": "recv",
             "WAIT": "wait (idle)"}
COMM_KINDS = ("SEND", "RECV")
DPI = 120
WIDTH = 10.5  # inches; ~1260 px at DPI, the report column width


@contextmanager
def theme():
    """Apply THEME for the duration of one figure and restore the caller's rcParams after."""
    with plt.rc_context():
        sns.set_theme(**THEME)
        yield


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend_right(ax, handles=None, title=None):
    kw = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title=title)
    if handles is not None:
        kw["handles"] = handles
    ax.legend(**kw)


def _bar_height(n: int) -> float:
    return max(2.6, 0.42 * n + 1.3)


def human(x: float) -> str:
    """1234 -> 1.23k, 1.5e9 -> 1.5B (counts, not bytes)."""
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def _err(frame: pd.DataFrame, scale: pd.Series | float = 1.0) -> np.ndarray:
    """Asymmetric error bars [value − lo, hi − value] from spread columns (0 where unknown)."""
    v = frame["value"] * scale
    lo = (v - frame["spread_lo"] * scale).clip(lower=0).fillna(0)
    hi = (frame["spread_hi"] * scale - v).clip(lower=0).fillna(0)
    return np.vstack([lo.to_numpy(float), hi.to_numpy(float)])


def _grouped_barh(ax, labels: list[str], series: list[tuple[str, pd.DataFrame, object]],
                  scale_fn=None, fmt=lambda v: f"{v:.3g}"):
    """Horizontal grouped bars: one group per label, one bar per series (name, frame, colour).
    Each frame has label, value, spread_lo, spread_hi; missing labels leave a gap."""
    n = max(len(series), 1)
    h = 0.8 / n
    y = np.arange(len(labels))
    for k, (name, frame, color) in enumerate(series):
        f = frame.set_index("label").reindex(labels)
        if scale_fn is not None:
            f = scale_fn(f)
        pos = y - 0.4 + h * (k + 0.5)
        ok = f["value"].notna().to_numpy()
        ax.barh(pos[ok], f["value"][ok], height=h * 0.92, color=color, label=name)
        spread = ok & ((f["spread_hi"] - f["spread_lo"]) > 0).to_numpy()
        if spread.any():  # whiskers only where repeats gave a spread (not on theory rows)
            ax.errorbar(f["value"][spread], pos[spread], xerr=_err(f[spread]), fmt="none",
                        ecolor="#333", elinewidth=1, capsize=2.5)
        for p, v, hi in zip(pos[ok], f["value"][ok], f["spread_hi"][ok]):
            end = max(v, hi) if np.isfinite(hi) else v
            ax.annotate(fmt(v), (end, p), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=8, color="#333")
    ax.set_yticks(y, labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first case on top
    ax.grid(axis="y", visible=False)


# --- bench figures -----------------------------------------------------------------------------

def speedup(summary: pd.DataFrame, path: Path) -> Path | None:
    """Engine ÷ JAX tokens/s per case: median bar, 25–75% whiskers, dashed line at 1.0."""
    d = pick(summary, "speedup", "ratio")
    if d.empty:
        return None
    labels = case_order(d)
    d = d.set_index("label").reindex(labels).reset_index()
    with theme():
        fig, ax = plt.subplots(figsize=(WIDTH, _bar_height(len(labels))))
        colors = [SIDE["engine"] if v >= 1 else SIDE["jax"] for v in d["value"]]
        y = np.arange(len(labels))
        ax.barh(y, d["value"], height=0.62, color=colors)
        spread = ((d["spread_hi"] - d["spread_lo"]) > 0).to_numpy()
        if spread.any():
            ax.errorbar(d["value"][spread], y[spread], xerr=_err(d[spread]), fmt="none",
                        ecolor="#333", elinewidth=1, capsize=3)
        for p, v, hi in zip(y, d["value"], d["spread_hi"]):
            end = max(v, hi) if np.isfinite(hi) else v
            ax.annotate(f"{v:.2f}×", (end, p), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=8.5)
        ax.axvline(1.0, color="#333", ls="--", lw=1.2)
        ax.set_yticks(y, labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
        top = np.nanmax(np.r_[d["value"], d["spread_hi"], 1.0])
        ax.set_xlim(0, top * 1.15)
        ax.set_xlabel("speedup: engine tokens/s ÷ JAX tokens/s (×)")
        ax.set_ylabel("case")
        ax.set_title("Engine speedup over JAX per case (median, whiskers 25–75%)")
        _legend_right(ax, handles=[Patch(color=SIDE["engine"], label="engine faster"),
                                   Patch(color=SIDE["jax"], label="JAX faster"),
                                   plt.Line2D([], [], color="#333", ls="--", label="1.0 = equal")])
        return _save(fig, path)


def _log_if_wide(ax, values: pd.Series, axis: str = "x", ratio: float = 30.0) -> bool:
    v = values[values > 0]
    if len(v) and v.max() / v.min() > ratio:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        return True
    return False


def throughput(summary: pd.DataFrame, path: Path) -> Path | None:
    """Tokens/s per case, engine and JAX side by side, 25–75% whiskers."""
    d = pick(summary, "tokens_per_s")
    d = d[d["side"].isin(["engine", "jax"])]
    if d.empty:
        return None
    labels = case_order(d)
    with theme():
        fig, ax = plt.subplots(figsize=(WIDTH, _bar_height(len(labels) * 1.4)))
        series = [(SIDE_NAME[s], d[d["side"] == s], SIDE[s]) for s in ("engine", "jax")
                  if (d["side"] == s).any()]
        _grouped_barh(ax, labels, series, fmt=human)
        log = _log_if_wide(ax, d["value"])
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        if not log:
            ax.set_xlim(0, d["value"].max() * 1.18)
        else:
            ax.set_xlim(right=d["value"].max() * 3)
        ax.set_xlabel("throughput (tokens/s" + (", log scale)" if log else ")"))
        ax.set_ylabel("case")
        ax.set_title("Training throughput per case (median, whiskers 25–75%)")
        _legend_right(ax)
        return _save(fig, path)


def mfu(summary: pd.DataFrame, path: Path) -> Path | None:
    """MFU (6·N + 6·L·T·C FLOPs per token × tokens/s ÷ peak) per case and side, in percent."""
    d = pick(summary, "mfu")
    d = d[d["side"].isin(["engine", "jax"])]
    if d.empty:
        return None
    labels = case_order(d)

    def to_pct(f):
        f = f.copy()
        units = f["unit"].fillna("")
        for c in ("value", "spread_lo", "spread_hi"):
            f[c] = percent(f[c], units)
        return f

    with theme():
        fig, ax = plt.subplots(figsize=(WIDTH, _bar_height(len(labels) * 1.4)))
        series = [(SIDE_NAME[s], d[d["side"] == s], SIDE[s]) for s in ("engine", "jax")
                  if (d["side"] == s).any()]
        _grouped_barh(ax, labels, series, scale_fn=to_pct, fmt=lambda v: f"{v:.1f}%")
        top = to_pct(d.set_index("label"))[["value", "spread_hi"]].max().max()
        ax.set_xlim(0, max(top * 1.18, 1.0))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_xlabel("MFU (% of the peak FLOP/s stored with each row)")
        ax.set_ylabel("case")
        ax.set_title("Model FLOPs utilisation per case (median, whiskers 25–75%)")
        _legend_right(ax)
        return _save(fig, path)


SCALING_VARS = {
    # var -> (columns that move with it, axis label, tick formatter)
    "stages": (["stages"], "pipeline stages p (log2)", lambda v: f"{v:g}"),
    "microbatches": (["microbatches"], "micro-batches per step m (log2)", lambda v: f"{v:g}"),
    "model_params": (["n_layer", "n_embd", "n_head", "vocab_size"],
                     "model size N, parameters excl. position embeddings (log2)", human),
}


def find_sweeps(summary: pd.DataFrame, var: str) -> list[tuple[str, pd.DataFrame]]:
    """Groups of tokens/s rows that differ only in `var` (≥ 2 distinct values), each with a
    short label naming what sets the group apart from the others."""
    d = pick(summary, "tokens_per_s")
    d = d[d["side"].isin(["engine", "jax"])] if len(d) else d
    if d.empty:
        return []
    moving = SCALING_VARS[var][0] + ["model_params"]
    keys = [c for c in ["source"] + CONFIG_COLUMNS if c not in moving and c in d.columns]
    groups = []
    for _, g in d.groupby(keys, sort=False, dropna=False):
        if g[var].nunique() >= 2:
            groups.append(g)
    if not groups:
        return []
    firsts = pd.DataFrame([g.iloc[0][keys] for g in groups])
    differ = [k for k in keys if firsts[k].astype(str).nunique() > 1]
    out = []
    for g in groups:
        row = g.iloc[0]
        lab = ", ".join(f"{k}={row[k]}" for k in differ) if differ else _fixed(row, var)
        out.append((lab, g))
    return out


def _fixed(row, var: str) -> str:
    """What a lone sweep holds fixed, e.g. 'L48 C1600 · T1024 B32 · 1f1b p=4 · NVIDIA H200 bf16'."""
    bits = []
    if var != "model_params" and row.get("n_layer"):
        bits.append(f"L{row['n_layer']} C{row['n_embd']}")
    if row.get("seq_len"):
        bits.append(f"T{row['seq_len']} B{row['batch_size']}")
    pipe = []
    if row.get("schedule") not in (None, "", "none"):
        pipe.append(str(row["schedule"]))
    if var != "stages" and (row.get("stages", 1) > 1 or pipe):
        pipe.append(f"p={row['stages']}")
    if var != "microbatches" and (row.get("microbatches", 1) > 1 or pipe):
        pipe.append(f"m={row['microbatches']}")
    if pipe:
        bits.append(" ".join(pipe))
    dev = " ".join(str(row.get(k) or "") for k in ("device", "dtype")).strip()
    if dev:
        bits.append(dev)
    return " · ".join(bits) or "one sweep"


def scaling(summary: pd.DataFrame, var: str, path: Path) -> Path | None:
    """Tokens/s against `var` (stages | microbatches | model_params) on a log2 axis: median line
    and 25–75% band per side, one panel per sweep found; None when no sweep varies `var`."""
    sweeps = find_sweeps(summary, var)
    if not sweeps:
        return None
    _, xlabel, tick = SCALING_VARS[var]
    n = len(sweeps)
    cols = min(n, 3)
    rows = -(-n // cols)
    with theme():
        fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, 3.6 * rows + 0.4), squeeze=False)
        for ax, (lab, g) in zip(axes.flat, sweeps):
            for side in ("engine", "jax"):
                s = g[g["side"] == side].sort_values(var)
                if s.empty:
                    continue
                x = s[var].to_numpy(float)
                ax.plot(x, s["value"], marker="o", color=SIDE[side], label=SIDE_NAME[side])
                if s["spread_lo"].notna().any():
                    ax.fill_between(x, s["spread_lo"], s["spread_hi"], color=SIDE[side],
                                    alpha=0.22, lw=0, label=f"{SIDE_NAME[side]} 25–75%")
            if var == "stages":
                e = g[g["side"] == "engine"].sort_values(var)
                if len(e):
                    x0, y0 = float(e[var].iloc[0]), float(e["value"].iloc[0])
                    xs = e[var].to_numpy(float)
                    ax.plot(xs, y0 * xs / x0, color="#777", ls=":", lw=1.2,
                            label="ideal linear (engine)")
            ax.set_xscale("log", base=2)
            xs = sorted(g[var].astype(float).unique())
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick(v)))
            vals = pd.concat([g["value"], g["spread_lo"], g["spread_hi"]]).dropna()
            if var == "model_params" and len(vals) and vals.max() / vals[vals > 0].min() > 8:
                ax.set_yscale("log")  # throughput falls ~1/N: log-log reads as a line
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.set_ylabel("throughput (tokens/s, log scale)")
            else:
                ax.set_ylim(bottom=0)
                ax.set_ylabel("throughput (tokens/s)")
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(lab, fontsize=10, fontweight="normal")
            ax.set_xlabel(xlabel)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        handles, names = [], []
        for ax in list(axes.flat)[:n]:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in names:
                    handles.append(h)
                    names.append(l)
        what = {"stages": "pipeline stages", "microbatches": "micro-batches",
                "model_params": "model size"}[var]
        fig.suptitle(f"Scaling with {what}: tokens/s, median line and 25–75% band")
        fig.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 0.93))
        fig.tight_layout()
        return _save(fig, path)


def bubble(summary: pd.DataFrame, path: Path) -> Path | None:
    """Measured (engine timeline), simulated (the schedule replayed with the job's own F/B/W
    durations) and theoretical (equal stages) bubble per pipelined case, grouped by schedule;
    percent of step time."""
    d = pick(summary, "bubble")
    d = d[d["side"].isin(["engine", "theory"])] if len(d) else d
    if d.empty:
        return None
    sim = pick(summary, "bubble_sim")
    sim = sim[sim["side"] == "theory"].assign(side="simulated")
    d = pd.concat([d, sim], ignore_index=True) if len(sim) else d.copy()
    for c in ("value", "spread_lo", "spread_hi"):
        d[c] = percent(d[c], d["unit"])
    meta = d.drop_duplicates("label").sort_values(["schedule", "stages", "microbatches", "chunks"],
                                                  kind="stable")

    def desc(r):
        s = f"{r['schedule']} · p={r['stages']} m={r['microbatches']}"
        return s + (f" v={r['chunks']}" if r["chunks"] and r["chunks"] > 1 else "")

    descs = [desc(r) for _, r in meta.iterrows()]
    dup = {x for x in descs if descs.count(x) > 1}
    names = {r["label"]: (f"{x}  ({r['label']})" if x in dup else x)
             for x, (_, r) in zip(descs, meta.iterrows())}
    d["label2"] = d["label"].map(names)
    labels = [names[l] for l in meta["label"]]
    with theme():
        fig, ax = plt.subplots(figsize=(WIDTH, _bar_height(len(labels) * 1.4)))
        series = []
        for side, name in (("engine", SIDE_NAME["measured"]), ("simulated", SIDE_NAME["simulated"]),
                           ("theory", SIDE_NAME["theory"])):
            s = d[d["side"] == side].assign(label=lambda f: f["label2"])
            if len(s):
                series.append((name, s, SIDE[side]))
        _grouped_barh(ax, labels, series, fmt=lambda v: f"{v:.1f}%")
        # thin separators between schedules
        sched = list(meta["schedule"])
        for i in range(1, len(sched)):
            if sched[i] != sched[i - 1]:
                ax.axhline(i - 0.5, color="#bbb", lw=0.8)
        top = d[["value", "spread_hi"]].max().max()
        ax.set_xlim(0, max(top * 1.2, 1.0))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_xlabel("pipeline bubble (% of step time idle across ranks)")
        ax.set_ylabel("schedule · stages p · micro-batches m")
        ax.set_title("Pipeline bubble per schedule: measured, simulated, theoretical")
        _legend_right(ax)
        return _save(fig, path)


def timeline(rows: pd.DataFrame, label: str, path: Path, subtitle: str = "") -> Path | None:
    """Gantt chart of the last step in a case's timelines: one row per rank, compute kinds as
    full bars labelled with their micro-batch, send/recv as a thin strip, waits hatched."""
    if rows.empty:
        return None
    step = int(rows["step"].max())
    s = rows[rows["step"] == step].copy()
    t0 = s["start_us"].min()
    s["x"] = (s["start_us"] - t0) / 1000.0
    s["w"] = (s["end_us"] - s["start_us"]).clip(lower=0) / 1000.0
    ranks = sorted(s["rank"].unique())
    span = float((s["x"] + s["w"]).max()) or 1.0
    with theme():
        fig, ax = plt.subplots(figsize=(WIDTH, 0.75 * len(ranks) + 1.6))
        for r in ranks:
            rr = s[s["rank"] == r]
            for kind, g in rr.groupby("kind", sort=False):
                kind = str(kind)
                color = KIND.get(kind, "#bbb")
                if kind in COMM_KINDS:
                    ybar, hbar = r + 0.3, 0.14
                else:
                    ybar, hbar = r - 0.38, 0.64
                hatch = "////" if kind == "WAIT" else None
                ax.broken_barh(list(zip(g["x"], g["w"])), (ybar, hbar), facecolors=color,
                               edgecolor="#9aa0a6" if kind == "WAIT" else "white",
                               linewidth=0.5, hatch=hatch)
                if kind in ("F", "B", "W", "BW") and "microbatch" in g:
                    for x, w, mb in zip(g["x"], g["w"], g["microbatch"]):
                        if w > span * 0.018 and pd.notna(mb) and mb >= 0:
                            ax.text(x + w / 2, r - 0.06, f"{int(mb)}", ha="center", va="center",
                                    fontsize=7.5, color="white" if kind != "BW" else "#222")
        ticks = []
        for r in ranks:
            st = s.loc[(s["rank"] == r) & s["kind"].isin(["F", "B", "W", "BW"]), "stage"] \
                if "stage" in s else pd.Series(dtype=float)
            st = sorted({int(v) for v in st.dropna() if v >= 0})
            ticks.append(f"rank {r}" + (f"\nstage{'s' if len(st) > 1 else ''} "
                                        f"{','.join(map(str, st))}" if st else ""))
        ax.set_yticks(ranks, ticks)
        ax.set_ylim(max(ranks) + 0.6, min(ranks) - 0.6)
        ax.set_xlim(0, span * 1.01)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("time since the step's first event (ms)")
        ax.set_ylabel("rank")
        title = f"Pipeline timeline — {label}, step {step}"
        ax.set_title(title + (f"\n{subtitle}" if subtitle else ""))
        present = [k for k in KIND if (s["kind"] == k).any()]
        handles = [Patch(facecolor=KIND[k], edgecolor="#9aa0a6" if k == "WAIT" else KIND[k],
                         hatch="////" if k == "WAIT" else None, label=KIND_NAME[k])
                   for k in present]
        _legend_right(ax, handles=handles, title="kind (number = micro-batch)")
        return _save(fig, path)


# --- parity and losses -------------------------------------------------------------------------

def parity(rows: pd.DataFrame, path: Path) -> Path | None:
    """Worst share of tolerance per tensor group over all cases: horizontal bars on a log axis,
    red where a group holds a failing tensor, a line at 1.0 (= the tolerance)."""
    rows = rows[rows["share"].notna()]
    if rows.empty:
        return None
    worst = rows.loc[rows.groupby("group", sort=False)["share"].idxmax()].copy()
    failing = rows.groupby("group")["passed"].apply(lambda p: bool((~p).any()))
    worst["failed"] = worst["group"].map(failing)
    worst = worst.sort_values("share", ascending=False)
    pos = worst["share"][worst["share"] > 0]
    floor = 10 ** np.floor(np.log10(pos.min())) / 10 if len(pos) else 1e-6
    vals = worst["share"].clip(lower=floor).to_numpy(float)
    with theme():
        fig, ax = plt.subplots(figsize=(WIDTH, _bar_height(len(worst))))
        y = np.arange(len(worst))
        colors = [VERDICT["fail"] if f else VERDICT["pass"] for f in worst["failed"]]
        ax.barh(y, vals - floor, left=floor, height=0.62, color=colors)
        for p, v, t in zip(y, worst["share"], worst["tensor"]):
            ax.annotate(f"{v:.2g}  {t}", (max(v, floor), p), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7.5, color="#333")
        ax.axvline(1.0, color=VERDICT["fail"], ls="--", lw=1.3)
        ax.set_xscale("log")
        ax.set_xlim(floor, max(vals.max(), 1.0) * 60)
        ax.set_yticks(y, worst["group"])
        ax.set_ylim(len(worst) - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("share of tolerance used: error ÷ tolerance (log scale; > 1 fails)")
        ax.set_ylabel("tensor group")
        ax.set_title("Parity: worst share of tolerance per tensor group (all cases)")
        _legend_right(ax, handles=[Patch(color=VERDICT["pass"], label="all within tolerance"),
                                   Patch(color=VERDICT["fail"], label="holds a failure"),
                                   plt.Line2D([], [], color=VERDICT["fail"], ls="--",
                                              label="tolerance (1.0)")])
        return _save(fig, path)


def losses(rows: pd.DataFrame, path: Path) -> Path | None:
    """Loss per optimizer step, engine and JAX overlaid, one column per trajectory case; below
    each, the relative difference |engine − JAX| ÷ |JAX| on a log axis (the curves overlap)."""
    if rows.empty:
        return None
    labels = list(dict.fromkeys(rows["label"]))
    cols = min(len(labels), 3)
    groups = [labels[i:i + cols] for i in range(0, len(labels), cols)]
    with theme():
        fig = plt.figure(figsize=(WIDTH, 4.6 * len(groups) + 0.3))
        sub = fig.add_gridspec(len(groups) * 2, cols, height_ratios=[3, 1.3] * len(groups),
                               hspace=0.15)
        for gi, group in enumerate(groups):
            for ci, lab in enumerate(group):
                top = fig.add_subplot(sub[2 * gi, ci])
                bot = fig.add_subplot(sub[2 * gi + 1, ci], sharex=top)
                d = rows[rows["label"] == lab]
                curves = {}
                for side, ls, mk in (("engine", "-", None), ("jax", "--", "o")):
                    c = d[d["side"] == side].sort_values("step")
                    if c.empty:
                        continue
                    curves[side] = c.set_index("step")["loss"]
                    top.plot(c["step"], c["loss"], ls=ls, marker=mk, markersize=3.2,
                             markevery=max(1, len(c) // 12), color=SIDE[side],
                             label=SIDE_NAME[side], lw=2.0 if side == "engine" else 1.4)
                top.set_title(lab, fontsize=10.5)
                top.set_ylabel("loss (nats/token)")
                top.tick_params(labelbottom=False)
                if "engine" in curves and "jax" in curves:
                    e, j = curves["engine"].align(curves["jax"], join="inner")
                    rel = ((e - j).abs() / j.abs().replace(0, np.nan)).replace(0, np.nan)
                    if rel.notna().any():
                        bot.semilogy(rel.index, rel.to_numpy(), color="#555", lw=1.2)
                    else:
                        bot.text(0.5, 0.5, "identical at every step", transform=bot.transAxes,
                                 ha="center", va="center", fontsize=9, color="#555")
                        bot.set_yticks([])
                else:
                    bot.text(0.5, 0.5, "one side only", transform=bot.transAxes, ha="center",
                             va="center", fontsize=9, color="#555")
                bot.set_ylabel("|Δ| ÷ |JAX|")
                bot.xaxis.set_major_locator(MaxNLocator(integer=True))
                bot.set_xlabel("optimizer step")
        handles = [plt.Line2D([], [], color=SIDE["engine"], lw=2, label=SIDE_NAME["engine"]),
                   plt.Line2D([], [], color=SIDE["jax"], ls="--", marker="o", markersize=3.2,
                              label=SIDE_NAME["jax"]),
                   plt.Line2D([], [], color="#555", label="relative difference (lower panel)")]
        fig.suptitle("Loss curves: engine vs JAX per trajectory case", y=1.0)
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.905, 0.95))
        return _save(fig, path)


# --- compare -----------------------------------------------------------------------------------

def compare_ratios(diff: pd.DataFrame, path: Path, threshold: float) -> Path | None:
    """Before → after change per case for the headline metrics, as a factor where > 1 is better
    (log2 axis), coloured by verdict, with the regression threshold marked."""
    if diff.empty:
        return None
    heads = [("tokens_per_s", "engine", "engine tokens/s"), ("speedup", "ratio", "speedup vs JAX"),
             ("step_ms", "engine", "engine step time"), ("mfu", "engine", "engine MFU"),
             ("peak_mem_bytes", "engine", "engine peak memory")]
    panels = [(t, diff[(diff["metric"] == m) & (diff["side"] == s) & diff["better"].notna()])
              for m, s, t in heads]
    panels = [(t, d) for t, d in panels if len(d)]
    if not panels:
        return None
    labels = list(dict.fromkeys(pd.concat([d for _, d in panels])["label"]))
    with theme():
        fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH, _bar_height(len(labels))),
                                 sharey=True, squeeze=False)
        for ax, (title, d) in zip(axes[0], panels):
            d = d.set_index("label").reindex(labels)
            y = np.arange(len(labels))
            ok = d["better"].notna().to_numpy()
            colors = [VERDICT[v] for v in d["verdict"].fillna("same")]
            cols = [c for c, o in zip(colors, ok) if o]
            ax.barh(y[ok], np.log2(d["better"][ok]), height=0.6, color=cols)
            ax.scatter(np.log2(d["better"][ok]), y[ok], color=cols, s=14, zorder=3)
            ax.axvline(0, color="#333", lw=1)
            for t in (np.log2(threshold), -np.log2(threshold)):
                ax.axvline(t, color="#999", ls=":", lw=1)
            lim = max(1.2, np.nanmax(np.abs(np.log2(d["better"][ok]))) * 1.25)
            ax.set_xlim(-lim, lim)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{2 ** v:.2g}×"))
            ax.set_title(title, fontsize=10)
            ax.set_yticks(y, labels)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.grid(axis="y", visible=False)
        axes[0][0].set_ylabel("case")
        fig.supxlabel("after vs before in the metric's good direction (×, > 1 better)",
                      fontsize=10)
        fig.suptitle(f"Before → after per case (log2 axis; dotted: ±{threshold:g}× threshold)")
        handles = [Patch(color=VERDICT[v], label=v) for v in ("regression", "improved", "same")]
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.9))
        fig.tight_layout()
        return _save(fig, path)
