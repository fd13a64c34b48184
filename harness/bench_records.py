"""Rows and tables of `tandem bench`: the summary statistic (`summarize`: median [p25, p75]),
the Record rows of one case (`RowMaker`, `add_throughput_rows`: step time, tokens/s, FLOP/s,
MFU), run.json read back for a resume, the rows of an unfinished case dropped, and the final
table with its notes (`format_table`, `_table_notes`). Re-exported by harness.bench.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import numpy as np

from harness import flops as fl
from harness.config import CaseConfig, case_axes, case_id
from harness.errors import DataError
from harness.records import RECORD_COLUMNS, Record


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def summarize(values) -> tuple[float, float, float]:
    """(median, 25th percentile, 75th percentile) with numpy's linear interpolation."""
    a = np.asarray(values, dtype=float)
    return float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75))



# ---- records -----------------------------------------------------------------------------------


class RowMaker:
    """Builds the Record rows of one case: every row carries the case axes, device, backend,
    dtype, commit and timestamp."""

    def __init__(self, suite: str, case: CaseConfig, device: str, commit: str, stamp: str):
        axes = case_axes(case)
        if case.pipeline.stages == 1:
            axes["schedule"] = "none"  # one stage runs no schedule (the Record default)
        self.base = dict(suite=suite, case=case_id(case), device=device, backend=case.backend,
                         dtype=case.dtype, commit=commit, timestamp=stamp, **axes)
        self.rows: list[Record] = []

    def add(self, side: str, metric: str, unit: str, values, *, summary=None, peak=None) -> None:
        """Raw rows (repeat = 0, 1, ...) for `values`, then the summary row (repeat = -1):
        median [p25, p75] of `values`, or `summary` = (value, lo, hi) when given."""
        extra = {} if peak is None else {"peak_flops": peak[0], "peak_source": peak[1]}
        for i, v in enumerate(values):
            self.rows.append(Record(side=side, metric=metric, unit=unit, value=float(v), repeat=i,
                                    **extra, **self.base))
        med, lo, hi = summary if summary is not None else summarize(values)
        self.rows.append(Record(side=side, metric=metric, unit=unit, value=med, repeat=-1,
                                spread_lo=lo, spread_hi=hi, **extra, **self.base))


def add_throughput_rows(rows: RowMaker, side: str, case: CaseConfig, step_s: list[float],
                        peak: tuple[float, str]) -> None:
    """step_ms, tokens_per_s, flops_per_s, mfu, mfu_palm of one side from its per-repeat
    median step times. The summaries of the derived metrics are computed from the tokens/s
    summary (a linear map), so MFU = tokens/s x FLOPs/token / peak holds on every row."""
    tokens = case.batch_size * case.seq_len
    fpt, fpt_palm = fl.flops_for_case(case, "tandem"), fl.flops_for_case(case, "palm")
    tps = [tokens / s for s in step_s]
    s_tps = summarize(tps)
    rows.add(side, "step_ms", "ms", [s * 1e3 for s in step_s])
    rows.add(side, "tokens_per_s", "tokens/s", tps, summary=s_tps)
    rows.add(side, "flops_per_s", "FLOP/s", [fl.achieved_flops(fpt, t) for t in tps],
             summary=tuple(fl.achieved_flops(fpt, t) for t in s_tps))
    if peak[0] > 0:  # NaN when no peak is known: no MFU rows rather than NaN rows
        for metric, f in (("mfu", fpt), ("mfu_palm", fpt_palm)):
            rows.add(side, metric, "fraction", [fl.mfu(f, t, peak[0]) for t in tps],
                     summary=tuple(fl.mfu(f, t, peak[0]) for t in s_tps), peak=peak)


# ---- run.json and the final table --------------------------------------------------------------


def _load_run_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read run.json to resume: {e}. HINT: use another --out "
                        "or remove the file") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: run.json is not a JSON object")
    return obj


def _drop_case_rows(path: Path, suite: str, case: str) -> None:
    """Remove rows of an unfinished case (an interrupted earlier run) before it runs again."""
    if not path.exists():
        return
    import pandas as pd

    df = pd.read_parquet(path)
    keep = ~((df["suite"] == suite) & (df["case"] == case))
    if not keep.all():
        tmp = path.with_suffix(".parquet.tmp")
        df[keep].to_parquet(tmp, index=False)
        tmp.replace(path)


def _fmt_si(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def format_table(records, cases: list[CaseConfig], run: dict) -> str:
    """The final table: case, engine tok/s, JAX tok/s, speedup median [p25, p75], MFU
    engine / JAX, bubble measured / simulated (the schedule replayed with the job's own stage
    durations) / theory; failed or partial cases say so."""
    import pandas as pd

    s = records[records["repeat"] == -1] if len(records) else pd.DataFrame(columns=RECORD_COLUMNS)

    def get(case, side, metric):
        m = s[(s["case"] == case) & (s["side"] == side) & (s["metric"] == metric)]
        return m.iloc[0] if len(m) else None

    head = ["case", "engine tok/s", "JAX tok/s", "speedup [p25, p75]", "MFU engine / JAX",
            "bubble meas. / sim. / theory"]
    body = []
    for c in cases:
        name = case_id(c)
        info = run.get("cases", {}).get(name, {})
        if info.get("status") == "failed":
            body.append([name, "FAILED (see below)", "-", "-", "-", "-"])
            continue
        e, j = get(name, "engine", "tokens_per_s"), get(name, "jax", "tokens_per_s")
        sp = get(name, "ratio", "speedup")
        me, mj = get(name, "engine", "mfu"), get(name, "jax", "mfu")
        bm, bt = get(name, "engine", "bubble"), get(name, "theory", "bubble")
        bs = get(name, "theory", "bubble_sim")
        pct = lambda r: f"{100 * r['value']:.1f}%" if r is not None else "-"  # noqa: E731
        body.append([
            name,
            _fmt_si(e["value"]) if e is not None else (
                "OOM" if info.get("engine", {}).get("status") == "out of memory" else
                "n/a" if info.get("engine", {}).get("status") == "unavailable" else "-"),
            _fmt_si(j["value"]) if j is not None else _oom_cell(info.get("jax_attempts", [])),
            f"{sp['value']:.2f}x [{sp['spread_lo']:.2f}, {sp['spread_hi']:.2f}]"
            if sp is not None else "-",
            f"{pct(me)} / {pct(mj)}",
            f"{pct(bm)} / {pct(bs)} / {pct(bt)}" if bt is not None else "-",
        ])
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                       for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _oom_cell(attempts: list[dict]) -> str:
    """The JAX column of a case whose JAX side fit in no variant: "OOM" (and the first ask)."""
    oom = [a for a in attempts if a.get("status") == "oom"]
    if not oom:
        return "-"
    asked = oom[0].get("asked_bytes")
    return f"OOM ({asked / 2**30:.1f} GiB)" if asked else "OOM"


def _table_notes(cases: list[CaseConfig], run: dict, records=None) -> list[str]:
    out = []
    for c in cases:
        info = run.get("cases", {}).get(case_id(c), {})
        if info.get("jax_baseline"):
            out.append(f"{case_id(c)}: JAX baseline = {info['jax_baseline']}")
        for side, b in (info.get("jax_baselines") or {}).items():
            line = f"{case_id(c)}: also JAX baseline {side} = {b['baseline']}"
            if records is not None and len(records):
                s = records[(records["repeat"] == -1) & (records["case"] == case_id(c))]
                t = s[(s["side"] == side) & (s["metric"] == "tokens_per_s")]
                r = s[(s["side"] == "ratio") & (s["metric"] == f"speedup_vs_{side[4:]}")]
                if len(t):
                    line += f": {_fmt_si(t.iloc[0]['value'])} tok/s"
                if len(r):
                    line += (f", engine {r.iloc[0]['value']:.2f}x [{r.iloc[0]['spread_lo']:.2f}, "
                             f"{r.iloc[0]['spread_hi']:.2f}]")
            out.append(line)
        rb = (info.get("engine") or {}).get("rank_bubble")
        if rb:
            out.append(f"{case_id(c)}: bubble per rank, measured / simulated (last job): " +
                       ", ".join(f"r{r} {100 * v['measured']:.1f}% / {100 * v['simulated']:.1f}%"
                                 for r, v in sorted(rb.items(), key=lambda kv: int(kv[0]))))
        for n in info.get("notes", []):
            out.append(f"{case_id(c)}: {n}")
        if info.get("status") == "failed":
            out.append(f"{case_id(c)}: FAILED: {info.get('error', '')}")
    return out
