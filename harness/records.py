"""Long-form result tables: one observation per row, written as parquet beside run.json.

A results directory holds:
  records.parquet   bench observations (schema RECORD_COLUMNS)
  parity.parquet    parity observations, one row per compared tensor (schema PARITY_COLUMNS)
  run.json          environment: machine, versions, commit, peaks, command line
  traces/*.json     Perfetto / Chrome-trace timelines of pipelined runs
This module owns the schemas; writers append rows, readers concatenate directories.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

# Bench rows. `repeat` is the 0-based repeat index of a raw observation, -1 for a summary row
# (median over repeats; `spread_lo`/`spread_hi` then hold the 25th/75th percentiles).
# `peak_flops` is the FLOP/s an MFU row divided by (NaN on other rows) and `peak_source` says
# where it came from ("datasheet H100 SXM bf16", "measured fp32 GEMM", ...).
RECORD_COLUMNS = [
    "suite", "case", "side", "metric", "value", "unit", "repeat", "spread_lo", "spread_hi",
    "device", "backend", "dtype", "n_layer", "n_embd", "n_head", "vocab_size", "seq_len",
    "batch_size", "stages", "microbatches", "schedule", "chunks", "peak_flops", "peak_source",
    "commit", "timestamp",
]

# Parity rows: `tier` is op | model | trajectory | schedule; `tensor` the compared quantity
# ("loss", "logits", "grad/h.0.attn.c_attn.weight", "param/wte.weight", "loss@step3",
# "op/layernorm.dx", ...). `share` = error / tolerance (> 1 fails); `metric` names which error
# the tolerance applies to ("rel_l2" or "rel").
PARITY_COLUMNS = [
    "suite", "case", "tier", "tensor", "max_abs", "rel_l2", "rel", "metric", "tol", "share",
    "passed", "backend", "dtype", "reference", "commit", "timestamp",
]


@dataclass
class Record:
    suite: str
    case: str
    side: str  # "engine" | "jax" | "ratio" (engine/jax) | "theory"
    metric: str  # tokens_per_s, step_ms, flops_per_s, mfu, bubble, peak_mem_bytes, speedup, ...
    value: float
    unit: str
    repeat: int = -1
    spread_lo: float = math.nan
    spread_hi: float = math.nan
    device: str = ""
    backend: str = "cpu"
    dtype: str = "fp32"
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0
    vocab_size: int = 0
    seq_len: int = 0
    batch_size: int = 0
    stages: int = 1
    microbatches: int = 1
    schedule: str = "none"
    chunks: int = 1
    peak_flops: float = math.nan
    peak_source: str = ""
    commit: str = ""
    timestamp: str = ""


@dataclass
class ParityRow:
    suite: str
    case: str
    tier: str
    tensor: str
    max_abs: float
    rel_l2: float
    rel: float
    metric: str
    tol: float
    share: float
    passed: bool
    backend: str = "cpu"
    dtype: str = "fp32"
    reference: str = "jax"
    commit: str = ""
    timestamp: str = ""


def to_frame(rows: Iterable[Record | ParityRow], columns: list[str]) -> pd.DataFrame:
    data = [asdict(r) for r in rows]
    return pd.DataFrame(data, columns=columns)


def append_parquet(path: Path, frame: pd.DataFrame) -> None:
    """Append rows to a parquet file (rewrite: tables here are small). Keeps finished rows of
    an interrupted run, which `tandem bench` uses to resume."""
    path = Path(path)
    if path.exists():
        frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True)
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def read_dirs(dirs: Iterable[Path], name: str = "records.parquet") -> pd.DataFrame:
    """Concatenate one table from several results directories, adding a `source` column."""
    frames = []
    for d in dirs:
        p = Path(d) / name
        if p.exists():
            f = pd.read_parquet(p)
            f["source"] = str(d)
            frames.append(f)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def write_json(path: Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


__all__ = [
    "RECORD_COLUMNS", "PARITY_COLUMNS", "Record", "ParityRow", "to_frame", "append_parquet",
    "read_dirs", "write_json",
]
