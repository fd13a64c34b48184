"""Read results directories into one in-memory bundle for the report.

What it is: loading and validation (missing dir, empty dir, unreadable file, missing column ->
DataError naming the path) plus the derivations every figure and table shares: median/spread
summaries, case labels, model size, tensor groups, unit conversions.
What it is not: plotting or formatting; nothing here writes a file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import DataError
from harness.records import PARITY_COLUMNS, RECORD_COLUMNS

# Columns a table must have for the report to use it; the rest of the schema is optional and
# filled with the defaults of harness.records (older or partial writers still render).
REQUIRED = {
    "records.parquet": ["case", "side", "metric", "value"],
    "parity.parquet": ["case", "tensor", "share", "passed"],
    "losses.parquet": ["case", "side", "step", "loss"],
    "timeline": ["rank", "step", "kind", "start_us", "end_us"],
}
RECORD_DEFAULTS = {
    "suite": "", "unit": "", "repeat": -1, "spread_lo": math.nan, "spread_hi": math.nan,
    "device": "", "backend": "", "dtype": "", "n_layer": 0, "n_embd": 0, "n_head": 0,
    "vocab_size": 0, "seq_len": 0, "batch_size": 0, "stages": 1, "microbatches": 1,
    "schedule": "none", "chunks": 1, "peak_flops": math.nan, "peak_source": "", "commit": "",
    "timestamp": "",
}
PARITY_DEFAULTS = {
    "suite": "", "tier": "model", "max_abs": math.nan, "rel_l2": math.nan, "rel": math.nan,
    "metric": "", "tol": math.nan, "backend": "", "dtype": "", "reference": "jax", "commit": "",
    "timestamp": "",
}
# The configuration that identifies a bench case (everything but the measurement).
CONFIG_COLUMNS = [
    "device", "backend", "dtype", "n_layer", "n_embd", "n_head", "vocab_size", "seq_len",
    "batch_size", "stages", "microbatches", "schedule", "chunks",
]
# Direction in which a metric gets better; metrics not listed are shown but never judged.
HIGHER_IS_BETTER = {"tokens_per_s", "flops_per_s", "mfu", "mfu_palm", "speedup"}
LOWER_IS_BETTER = {"step_ms", "bubble", "peak_mem_bytes", "compile_s"}
RESULT_FILES = ("records.parquet", "parity.parquet", "losses.parquet", "simulate.json")


@dataclass
class Results:
    """Everything the report reads, concatenated over directories.

    Every table carries `source` (the directory's display name) and `label` (the case name, or
    `source:case` where two directories hold a case of the same name).
    """

    dirs: list[Path]
    records: pd.DataFrame  # RECORD_COLUMNS + source, label (raw and summary rows as stored)
    parity: pd.DataFrame  # PARITY_COLUMNS + source, label, group
    losses: pd.DataFrame  # case, side, step, loss + source, label
    runs: dict[str, dict] = field(default_factory=dict)  # source -> run.json contents
    traces: list[tuple[str, Path]] = field(default_factory=list)  # (source, file)
    timelines: dict[str, pd.DataFrame] = field(default_factory=dict)  # label -> all ranks' rows

    @property
    def sources(self) -> list[str]:
        return list(self.runs)


def _display_names(dirs: list[Path]) -> list[str]:
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in dirs]


def _read_parquet(path: Path, kind: str) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types; all mean "not a usable table"
        raise DataError(f"{path}: cannot read as parquet ({exc}); HINT: rewrite it with "
                        "`tandem bench`/`tandem parity` or delete it") from exc
    _require(frame, kind, path)
    return frame


def _require(frame: pd.DataFrame, kind: str, path: Path) -> None:
    missing = [c for c in REQUIRED[kind] if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; has {list(frame.columns)}")


def _fill(frame: pd.DataFrame, defaults: dict, columns: list[str]) -> pd.DataFrame:
    frame = frame.copy()
    for col, default in defaults.items():
        if col not in frame.columns:
            frame[col] = default
    ordered = [c for c in columns if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def _read_run(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_timelines(root: Path) -> dict[str, pd.DataFrame]:
    """timelines/<case>/timeline_rank{r}.csv -> {case: rows of every rank}."""
    out: dict[str, pd.DataFrame] = {}
    if not root.is_dir():
        return out
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        frames = []
        for csv in sorted(case_dir.glob("timeline_rank*.csv")):
            try:
                f = pd.read_csv(csv)
            except Exception as exc:
                raise DataError(f"{csv}: cannot read as CSV ({exc})") from exc
            _require(f, "timeline", csv)
            f["kind"] = f["kind"].astype(str).str.strip().str.upper()
            frames.append(f)
        if frames:
            out[case_dir.name] = pd.concat(frames, ignore_index=True)
    return out


def load(dirs: list[Path]) -> Results:
    """Read and validate results directories. Raises DataError naming the offending path."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise DataError("no results directory given; HINT: tandem report DIR... --out OUT")
    for d in dirs:
        if not d.exists():
            raise DataError(f"results directory not found: {d}")
        if not d.is_dir():
            raise DataError(f"not a directory: {d} (expected a results directory)")
    names = _display_names(dirs)
    records, parity, losses, runs, traces, timelines = [], [], [], {}, [], {}
    for d, name in zip(dirs, names):
        found = [f for f in RESULT_FILES if (d / f).exists()]
        tl = _read_timelines(d / "timelines")
        if not found and not tl:
            raise DataError(
                f"no results in {d}: expected at least one of {', '.join(RESULT_FILES)} or "
                "timelines/<case>/timeline_rank*.csv; HINT: point at the directory "
                "`tandem bench --out` or `tandem parity --out` wrote")
        runs[name] = _read_run(d / "run.json")
        if (d / "records.parquet").exists():
            f = _fill(_read_parquet(d / "records.parquet", "records.parquet"),
                      RECORD_DEFAULTS, RECORD_COLUMNS)
            records.append(f.assign(source=name))
        if (d / "parity.parquet").exists():
            f = _fill(_read_parquet(d / "parity.parquet", "parity.parquet"),
                      PARITY_DEFAULTS, PARITY_COLUMNS)
            parity.append(f.assign(source=name))
        if (d / "losses.parquet").exists():
            losses.append(_read_parquet(d / "losses.parquet", "losses.parquet").assign(source=name))
        traces += [(name, p) for p in sorted((d / "traces").glob("*.json"))]
        timelines.update({(name, case): f for case, f in tl.items()})

    def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    res = Results(dirs, cat(records), cat(parity), cat(losses), runs, traces, {})
    # A case name seen in two directories is qualified by its directory everywhere.
    seen: dict[str, set[str]] = {}
    for frame in (res.records, res.parity, res.losses):
        if len(frame):
            for src, case in frame[["source", "case"]].drop_duplicates().itertuples(index=False):
                seen.setdefault(str(case), set()).add(src)
    for src, case in timelines:
        seen.setdefault(case, set()).add(src)

    def label(src: str, case: str) -> str:
        return f"{src}:{case}" if len(seen.get(case, ())) > 1 else case

    for frame in (res.records, res.parity, res.losses):
        if len(frame):
            frame["case"] = frame["case"].astype(str)
            frame["label"] = [label(s, c) for s, c in zip(frame["source"], frame["case"])]
    if len(res.records):
        res.records["repeat"] = res.records["repeat"].fillna(-1).astype(int)
    if len(res.parity):
        res.parity["group"] = [tensor_group(t, tier) for t, tier in
                               zip(res.parity["tensor"], res.parity["tier"])]
        res.parity["passed"] = res.parity["passed"].astype(bool)
    res.timelines = {label(s, c): f for (s, c), f in timelines.items()}
    return res


# --- derivations -------------------------------------------------------------------------------

def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, label, side, metric): `value` = median over repeats, `spread_lo` /
    `spread_hi` = 25th / 75th percentiles, `n` = number of raw repeats.

    A stored summary row (repeat = -1) wins; where only raw repeats exist the summary is computed
    here. A ratio/speedup row is derived from the engine and JAX tokens/s medians where the writer
    stored none (`derived` = True, no spread).
    """
    if records.empty:
        return pd.DataFrame()
    key = ["source", "label", "side", "metric"]
    raw = records[records["repeat"] >= 0]
    stored = records[records["repeat"] < 0].drop_duplicates(key, keep="last")
    stats = pd.DataFrame(columns=key + ["med", "q25", "q75", "n"])
    if len(raw):
        g = raw.groupby(key, sort=False)["value"]
        stats = pd.DataFrame({
            "med": g.median(), "q25": g.quantile(0.25), "q75": g.quantile(0.75), "n": g.size(),
        }).reset_index()
    out = stored.merge(stats, on=key, how="left")
    out["spread_lo"] = out["spread_lo"].where(out["spread_lo"].notna(), out["q25"])
    out["spread_hi"] = out["spread_hi"].where(out["spread_hi"].notna(), out["q75"])
    # raw-only keys: build summary rows from the first raw row of each key
    have = set(map(tuple, stored[key].itertuples(index=False)))
    extra = raw.drop_duplicates(key, keep="first")
    extra = extra[[tuple(k) not in have for k in extra[key].itertuples(index=False)]]
    if len(extra):
        extra = extra.drop(columns=["spread_lo", "spread_hi"]).merge(stats, on=key, how="left")
        extra = extra.assign(value=extra["med"], spread_lo=extra["q25"], spread_hi=extra["q75"],
                             repeat=-1)
        out = pd.concat([out, extra], ignore_index=True)
    out["n"] = out["n"].fillna(0).astype(int)
    out = out.drop(columns=["med", "q25", "q75"])
    out["derived"] = False
    # derived speedup where none was stored
    tps = out[out["metric"] == "tokens_per_s"]
    has_ratio = set(out.loc[out["metric"] == "speedup", "label"])
    rows = []
    for lab, g in tps.groupby("label", sort=False):
        sides = g.set_index("side")["value"]
        if lab not in has_ratio and "engine" in sides and "jax" in sides and sides["jax"] > 0:
            row = g[g["side"] == "engine"].iloc[0].copy()
            for col, val in {"side": "ratio", "metric": "speedup", "unit": "x",
                             "value": sides["engine"] / sides["jax"], "spread_lo": math.nan,
                             "spread_hi": math.nan, "n": 0, "derived": True}.items():
                row[col] = val
            rows.append(row)
    if rows:
        out = pd.concat([out, pd.DataFrame(rows)], ignore_index=True)
    out["model_params"] = model_params(out)
    return out.reset_index(drop=True)


def model_params(frame: pd.DataFrame) -> pd.Series:
    """GPT-2 parameter count N without position embeddings (the N of 6·N + 6·L·T·C):
    wte V·C, per layer 12·C² + 13·C (attn 4C² + 4C, mlp 8C² + 5C, two LayerNorms 4C), ln_f 2C."""
    V, C, L = (frame[c].fillna(0).astype(float) for c in ("vocab_size", "n_embd", "n_layer"))
    return V * C + L * (12 * C * C + 13 * C) + 2 * C


def pick(summary: pd.DataFrame, metric: str, side: str | None = None) -> pd.DataFrame:
    if summary.empty:
        return summary
    m = summary["metric"] == metric
    if side is not None:
        m &= summary["side"] == side
    return summary[m]


def case_order(summary: pd.DataFrame) -> list[str]:
    """Labels in the order the bench ran them (first appearance), stable across figures."""
    return list(dict.fromkeys(summary["label"])) if len(summary) else []


def percent(values: pd.Series, units: pd.Series) -> pd.Series:
    """Values of a share metric (mfu, bubble) in percent, whether stored as a fraction or %."""
    units = units.fillna("").astype(str).str.strip()
    return values.where(units == "%", values * 100.0)


def mib(values: pd.Series, units: pd.Series) -> pd.Series:
    """Memory values in MiB from bytes (the default), KiB, MiB or GiB."""
    scale = {"b": 2.0 ** -20, "bytes": 2.0 ** -20, "kib": 2.0 ** -10, "mib": 1.0, "gib": 1024.0}
    u = units.fillna("").astype(str).str.strip().str.lower()
    return values * u.map(lambda s: scale.get(s, 2.0 ** -20))


_LAYER = re.compile(r"^h\.\d+\.")


def tensor_group(tensor: str, tier: str = "") -> str:
    """Coarse group of a compared tensor, for 'which part of the model is off'.

    grad/h.3.attn.c_attn.weight -> "attn (grad)", param/wte.weight -> "embedding (param)",
    loss and loss@step7 -> "loss", logits -> "logits", op/layernorm.dx -> "op: layernorm".
    """
    t = str(tensor)
    if t.startswith("op/") or tier == "op":
        name = t.split("/", 1)[-1]
        return "op: " + re.split(r"[.\[]", name)[0]
    if t == "loss" or t.startswith("loss@") or t.startswith("loss/"):
        return "loss"
    if t.startswith("logits"):
        return "logits"
    kind, _, name = t.partition("/") if "/" in t else ("", "", t)
    name = _LAYER.sub("", name)
    if name.startswith("attn."):
        part = "attn"
    elif name.startswith("mlp."):
        part = "mlp"
    elif name.startswith(("ln_", "ln.")):
        part = "ln"
    elif name.startswith(("wte", "wpe")):
        part = "embedding"
    else:
        part = name.split(".")[0] or t
    return f"{part} ({kind})" if kind else part


def finite(x) -> bool:
    try:
        return x is not None and np.isfinite(float(x))
    except (TypeError, ValueError):
        return False
