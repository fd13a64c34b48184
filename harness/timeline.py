"""Engine timelines -> Chrome/Perfetto traces and measured pipeline bubbles.

The engine writes one `timeline_rank{r}.csv` per rank (header
`rank,step,kind,stage,microbatch,start_us,end_us`, microseconds on a common MPI_Wtime clock).
This module reads them, converts them to trace JSON and measures the bubble. It does not run the
engine and knows nothing of schedules' theory (see `harness.schedule`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from harness.errors import DataError

COLUMNS = ["rank", "step", "kind", "stage", "microbatch", "start_us", "end_us"]
COMPUTE_KINDS = ("F", "B", "W", "BW")  # busy time of the bubble
COMM_KINDS = ("SEND", "RECV", "WAIT")  # inside the step window, not busy
STEP_EXTRA_KINDS = ("OPT", "ALLREDUCE")  # outside the pipeline: excluded from the bubble
KINDS = COMPUTE_KINDS + COMM_KINDS + STEP_EXTRA_KINDS

_FILE_RE = re.compile(r"timeline_rank(\d+)\.csv")


def load_timelines(directory) -> pd.DataFrame:
    """Concatenate every `timeline_rank{r}.csv` in `directory` into one DataFrame with COLUMNS,
    sorted by rank, step and start. Raises DataError if none is found or a file is malformed
    (missing column, unknown kind, end before start, a rank column that disagrees with the name).
    """
    directory = Path(directory)
    found = {}  # rank -> path
    for path in directory.glob("timeline_rank*.csv"):
        m = _FILE_RE.fullmatch(path.name)
        if m:
            found[int(m.group(1))] = path
    if not found:
        raise DataError(f"{directory}: no timeline_rank{{r}}.csv files")
    frames = []
    for rank, path in sorted(found.items()):
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot parse timeline CSV: {exc}") from None
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected header "
                            f"{','.join(COLUMNS)}")
        df = df[COLUMNS].copy()
        df["kind"] = df["kind"].astype(str).str.strip()
        bad = sorted(set(df["kind"]) - set(KINDS))
        if bad:
            raise DataError(f"{path}: unknown kind(s) {bad}; allowed: {', '.join(KINDS)}")
        if len(df) and (df["rank"] != rank).any():
            raise DataError(f"{path}: rank column holds {sorted(set(df['rank']))}, "
                            f"expected {rank} from the file name")
        if (df["end_us"] < df["start_us"]).any():
            row = df[df["end_us"] < df["start_us"]].iloc[0]
            raise DataError(f"{path}: an action ends before it starts: {row.to_dict()}")
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["rank", "step", "start_us"], kind="stable").reset_index(drop=True)


def _int_or_none(value):
    return None if pd.isna(value) or int(value) < 0 else int(value)


def _event_name(kind: str, mb, stage) -> str:
    if kind in STEP_EXTRA_KINDS or mb is None:
        return kind
    return f"{kind} mb{mb} s{stage}" if stage is not None else f"{kind} mb{mb}"


def to_chrome_trace(df: pd.DataFrame) -> dict:
    """Chrome / Perfetto trace JSON (the "traceEvents" object form).

    One process per rank (pid = rank, named "rank r"); thread 0 "compute" holds F, B, W, BW and
    OPT, thread 1 "comm" holds SEND, RECV, WAIT and ALLREDUCE. Each action is a complete ("X")
    event named like "F mb3 s1" with args {step, stage, mb}; ts/dur are microseconds relative
    to the earliest start in `df` (so traces start at 0).
    """
    events: list = []
    t0 = float(df["start_us"].min()) if len(df) else 0.0
    for rank in sorted(df["rank"].unique()):
        pid = int(rank)
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {pid}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        for tid, label in ((0, "compute"), (1, "comm")):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"name": label}})
    for row in df.itertuples(index=False):
        kind = str(row.kind)
        stage, mb = _int_or_none(row.stage), _int_or_none(row.microbatch)
        comm = kind in COMM_KINDS or kind == "ALLREDUCE"
        events.append({
            "name": _event_name(kind, mb, stage), "cat": "comm" if comm else "compute",
            "ph": "X", "pid": int(row.rank), "tid": 1 if comm else 0,
            "ts": float(row.start_us) - t0, "dur": float(row.end_us) - float(row.start_us),
            "args": {"step": int(row.step), "stage": stage, "mb": mb},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(df: pd.DataFrame, path) -> Path:
    """Write `to_chrome_trace(df)` as JSON to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(df)))
    return path


def _busy_us(compute: pd.DataFrame) -> pd.Series:
    """Each rank's busy time (index: rank): the length of the union of its compute intervals, so
    that two actions of one rank overlapping in time (two stages' streams on one GPU) are not
    counted twice, which would make the bubble negative."""
    busy = {}
    for rank, g in compute.groupby("rank", sort=True):
        total, cur_start, cur_end = 0.0, None, None
        for start, end in sorted(zip(g["start_us"].astype(float), g["end_us"].astype(float))):
            if cur_end is None or start > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = start, end
            elif end > cur_end:
                cur_end = end
        if cur_end is not None:
            total += cur_end - cur_start
        busy[int(rank)] = total
    return pd.Series(busy, dtype=float)


def bubble_per_step(df: pd.DataFrame) -> pd.Series:
    """Measured bubble of every step (index: step), see `measured_bubble` for the definition."""
    ranks = df["rank"].nunique()
    window = df[df["kind"].isin(COMPUTE_KINDS + COMM_KINDS)]
    values = {}
    for step, g in window.groupby("step", sort=True):
        wall = float(g["end_us"].max() - g["start_us"].min())
        compute = g[g["kind"].isin(COMPUTE_KINDS)]
        busy = float(_busy_us(compute).sum())
        values[int(step)] = 1.0 - busy / (ranks * wall) if wall > 0 else float("nan")
    return pd.Series(values, name="bubble", dtype=float).rename_axis("step")


def bubble_per_rank(df: pd.DataFrame) -> pd.DataFrame:
    """Each rank's idle share of every step (index: step, columns: rank): 1 − the rank's busy
    compute ÷ the step's wall time (the same window as `bubble_per_step`, whose value is the mean
    of these over the ranks)."""
    window = df[df["kind"].isin(COMPUTE_KINDS + COMM_KINDS)]
    ranks = sorted(int(r) for r in df["rank"].unique())
    rows = {}
    for step, g in window.groupby("step", sort=True):
        wall = float(g["end_us"].max() - g["start_us"].min())
        compute = g[g["kind"].isin(COMPUTE_KINDS)]
        busy = _busy_us(compute)
        rows[int(step)] = {r: (1.0 - float(busy.get(r, 0.0)) / wall if wall > 0 else float("nan"))
                           for r in ranks}
    return pd.DataFrame.from_dict(rows, orient="index", columns=ranks).rename_axis("step")


def measured_bubble(df: pd.DataFrame, step: int | None = None) -> float:
    """1 − Σ_ranks busy compute time ÷ (ranks × step wall time).

    Busy time is the time a rank spends in F, B, W and BW actions (the union of their intervals:
    overlapping actions of one rank count once). The step wall time runs from the
    earliest start to the latest end of that step's compute and communication actions (F, B, W,
    BW, SEND, RECV, WAIT) across all ranks; OPT and ALLREDUCE (optimizer step, gradient
    reduction) are excluded from both sides, so this is the pipeline's own bubble. `ranks` is
    the number of ranks present in `df`.
    With `step`, that step's value; without, the median over steps, leaving out the first step
    (step 0, warm-up) when there is more than one.
    """
    per_step = bubble_per_step(df)
    if per_step.empty:
        raise DataError("timeline has no F/B/W/BW/SEND/RECV/WAIT actions to measure a bubble")
    if step is not None:
        if step not in per_step.index:
            raise DataError(f"step {step} not in timeline (steps: {list(per_step.index)})")
        return float(per_step[step])
    if len(per_step) > 1:
        per_step = per_step.iloc[1:]
    return float(per_step.median())
