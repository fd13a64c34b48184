"""The `tandem simulate` part of a report: figures drawn from simulate.json and the section
that `tandem report` adds for a results directory holding one (written by
`tandem simulate --out DIR`). What it is not: the simulation (harness.simulate) or pass/fail
decisions (they come in the json, decided by harness.simulate_cli).
"""

from __future__ import annotations

import json
from pathlib import Path

from reports.doc import Figure, Note, Section, Table

PARTS = ("forward", "backward_input", "backward_weight", "optimizer", "tp_comm_exposed",
         "dp_comm_exposed", "pipeline_idle", "shared_device_wait")
PART_NAME = {"forward": "F compute", "backward_input": "B compute (input grad)",
             "backward_weight": "W compute (weight grad)", "optimizer": "optimizer",
             "tp_comm_exposed": "TP comm (exposed)", "dp_comm_exposed": "DP comm (exposed)",
             "pipeline_idle": "pipeline bubble", "shared_device_wait": "shared-device wait"}


def figures(out: Path, meta: dict, fig_dir: Path | None = None) -> list:
    """Draw the breakdown bar, the scaling curve and the validation scatter into
    fig_dir (default OUT/figures); returns the paths written (those whose data exists)."""
    from reports.figures import WIDTH, _save, plt, theme

    fig_dir = Path(fig_dir or Path(out) / "figures")
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # the projection, then the fixed-batch curve (its breakdown changes with scale; the weak
    # curve's does not), else the weak curve
    more = meta.get("fixed_batch") or meta.get("scaling") or []
    bars = ([("projection", meta["projection"])] if meta.get("projection") else []) + \
        [(f"{r['gpus']:,} GPUs, M={r['microbatches']}", r) for r in more]
    if bars:
        with theme():
            fig, ax = plt.subplots(figsize=(WIDTH, 0.45 * len(bars) + 1.6))
            labels = [lab for lab, _ in bars]
            left = [0.0] * len(bars)
            for part in PARTS:
                vals = [r["breakdown_s"].get(part, 0.0) / r["step_s"] for _, r in bars]
                if not any(v > 1e-4 for v in vals):
                    continue
                ax.barh(labels, vals, left=left, label=PART_NAME[part])
                left = [a + b for a, b in zip(left, vals)]
            ax.invert_yaxis()
            ax.set_xlabel("share of the step (critical pipeline rank)")
            ax.set_xlim(0, 1)
            r0 = bars[0][1]
            ax.set_title(f"Where the step goes: {r0['model']} on {r0['cluster']}")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
            paths.append(_save(fig, fig_dir / "simulate_breakdown.png"))
    if meta.get("scaling"):
        rows, fixed = meta["scaling"], meta.get("fixed_batch") or []
        with theme():
            fig, ax = plt.subplots(1, 2, figsize=(WIDTH, 3.8))
            curves = [("weak: fixed micro-batches per pipeline", rows, "-")]
            if fixed:
                curves.append((f"fixed global batch {fixed[0]['global_batch_tokens'] / 2**20:.0f}M "
                               f"tokens", fixed, "--"))
            for i, (label, rs, ls) in enumerate(curves):
                g = [r["gpus"] for r in rs]
                ax[0].plot(g, [r["tokens_per_s"] / 1e6 for r in rs], marker="o", ls=ls,
                           label=label)
                ax[1].plot(g, [100 * r["mfu"] for r in rs], marker="o", ls=ls, color=f"C{i}",
                           label=f"MFU, {label.split(':')[0]}")
                ax[1].plot(g, [100 * r["bubble"] for r in rs], marker="s", ls=ls, color=f"C{i}",
                           alpha=0.45, label=f"bubble, {label.split(':')[0]}")
            ax[0].set_ylabel("million tokens/s")
            ax[0].legend(fontsize=7)
            ax[1].set_ylabel("% (MFU 6N+6LTC; bubble share of the pipeline)")
            ax[1].legend(fontsize=7)
            for a in ax:
                a.set_xscale("log", base=2)
                a.set_xlabel("GPUs")
            fig.suptitle(f"Scaling, {rows[0]['model']} on {rows[0]['cluster']}")
            paths.append(_save(fig, fig_dir / "simulate_scaling.png"))
    if meta.get("validation"):
        v = meta["validation"]
        with theme():
            fig, ax = plt.subplots(1, 2, figsize=(WIDTH, 4.0))
            for a, metric, unit in ((ax[0], "step_ms", "step ms"), (ax[1], "mfu", "MFU")):
                pts = [x for x in v if x["metric"] == metric]
                if not pts:
                    a.set_visible(False)
                    continue
                for role, mk in (("fitted", "s"), ("predicted", "o")):
                    sel = [x for x in pts if x["role"] == role]
                    a.scatter([x["reference"] for x in sel], [x["predicted"] for x in sel],
                              marker=mk, label=role)
                lo = min(min(x["reference"], x["predicted"]) for x in pts) * 0.85
                hi = max(max(x["reference"], x["predicted"]) for x in pts) * 1.15
                a.plot([lo, hi], [lo, hi], color="#9aa0a6", ls="--", lw=1)
                a.set_xlabel(f"measured / published {unit}")
                a.set_ylabel(f"simulated {unit}")
                if metric == "step_ms":
                    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

                    a.set_xscale("log")
                    a.set_yscale("log")
                    ticks = [t for t in (10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000)
                             if lo <= t <= hi]
                    for axis in (a.xaxis, a.yaxis):  # after set_*scale, which resets them
                        axis.set_major_locator(FixedLocator(ticks))
                        axis.set_major_formatter(ScalarFormatter())
                        axis.set_minor_formatter(NullFormatter())
                a.legend()
            fig.suptitle("Validation: simulated vs measured (Tandem) and published (MFU)")
            paths.append(_save(fig, fig_dir / "simulate_validation.png"))
    return paths


def _fmt(metric: str, x: float) -> str:
    return f"{x:.1f} ms" if metric == "step_ms" else f"{x:.1%}"


def section(dirs: list, fig_dir: Path, out: Path) -> Section | None:
    """The 'Simulated scale' section for the inputs holding simulate.json; None if none do."""
    found = [Path(d) / "simulate.json" for d in dirs if (Path(d) / "simulate.json").is_file()]
    if not found:
        return None
    s = Section("simulate", "Simulated scale (tandem simulate)",
                intro="One training step replayed with the schedule's actions and a cost model "
                      "of the target GPU and network (docs/simulate.md). Fitted points were used "
                      "to set a parameter; predicted points were not.")
    for path in found:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            s.blocks.append(Note(f"{path}: unreadable ({e})", "warn"))
            continue
        if meta.get("validation"):
            rows, flags = [], []
            for x in meta["validation"]:
                rows.append([x["name"], x["role"], _fmt(x["metric"], x["predicted"]),
                             _fmt(x["metric"], x["reference"]), f"{x['error']:+.1%}",
                             "ok" if x["ok"] else "outside", x.get("fitted") or "—"])
                flags.append("" if x["ok"] else "bad")
            s.blocks.append(Table("Validation", ["point", "role", "simulated", "reference",
                                                 "error", "verdict", "fitted here"], rows,
                                  flags, numeric=[False, False, True, True, True, False, False]))
        p = meta.get("projection")
        if p:
            b = p["breakdown_s"]
            rows = [[PART_NAME[k], f"{b.get(k, 0.0) * 1e3:,.0f} ms",
                     f"{b.get(k, 0.0) / p['step_s']:.1%}"] for k in PARTS
                    if abs(b.get(k, 0.0)) > 1e-9]
            s.blocks.append(Table(
                f"Projection: {p['model']} on {p['gpus']:,} GPUs ({p['cluster']}), tp={p['tp']} "
                f"pp={p['pp']} dp={p['dp']} vp={p['chunks']}: step {p['step_s']:.2f} s, "
                f"{p['tokens_per_s'] / 1e6:.1f}M tok/s, MFU {p['mfu']:.1%}",
                ["part of the step", "time", "share"], rows, numeric=[False, True, True]))
        if meta.get("amdahl_rows"):
            claim = meta.get("claim") or {}
            S = claim.get("speedup", 0)
            rows = []
            for x in meta["amdahl_rows"]:
                ceil = "none" if x["ceiling"] is None else f"{x['ceiling']:.2f}×"
                need = "impossible" if x["needed"] is None else f"{x['needed']:.1f}×"
                rows.append([x["part"], f"{x['f']:.1%}", ceil, need])
            s.blocks.append(Table(
                f"Amdahl ceiling of the claimed {S:g}× ({claim.get('source', '')})",
                ["share of the projected step made faster", "f", "ceiling 1/(1−f)",
                 f"speedup that share needs for {S:g}×"], rows,
                numeric=[False, True, True, True],
                note=meta["amdahl"][-1].strip() if meta.get("amdahl") else ""))
        written = figures(path.parent, meta, fig_dir)
        for w in written:
            title, cap = {
                "simulate_validation.png": ("Validation", "Left: step time of Tandem's measured "
                                            "runs; right: MFU of published runs; dashed: "
                                            "equality; squares were fitted on."),
                "simulate_breakdown.png": ("Step breakdown", "Share of the step on the critical "
                                           "pipeline rank (its own idle time is the bubble "
                                           "shown): compute by pass, exposed communication. "
                                           "Top: the projection; below: the fixed-batch "
                                           "scaling curve (M micro-batches per pipeline)."),
                "simulate_scaling.png": ("Scaling curve", "Solid: weak scaling at a fixed "
                                         "number of micro-batches per pipeline (the global "
                                         "batch grows with the GPU count); dashed: a fixed "
                                         "global batch, so micro-batches per pipeline fall and "
                                         "the bubble grows."),
            }[Path(w).name]
            s.blocks.append(Figure(Path(w).relative_to(out).as_posix(), title, cap))
    return s


__all__ = ["figures", "section"]
