"""Schedules dumped and loaded: the CSV the C executor reads (`to_csv` / `from_csv`), rows, and
JSON (`to_json` / `from_json`).

Everything here is re-exported by `harness.schedule` (import it from there). This module imports
the data types (`Action`, `Schedule`) from harness.schedule inside the functions that build them:
harness.schedule imports this module at its top.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from harness.errors import DataError

if TYPE_CHECKING:
    from harness.schedule import Schedule

CSV_HEADER = ("rank", "index", "kind", "stage", "microbatch")


def to_rows(s: Schedule) -> list:
    """One dict per action: rank, index (position in the rank's list), kind, stage, microbatch."""
    return [
        {"rank": r, "index": i, "kind": a.kind, "stage": a.stage, "microbatch": a.microbatch}
        for r, acts in enumerate(s.actions) for i, a in enumerate(acts)
    ]


def to_csv(s: Schedule, path) -> None:
    """Write the CSV the C executor reads: the header `rank,index,kind,stage,microbatch` on the
    first line (no comment before it), then one line per action, ranks in order."""
    with open(path, "w", newline="") as fh:
        fh.write(",".join(CSV_HEADER) + "\n")
        for row in to_rows(s):
            fh.write(",".join(str(row[c]) for c in CSV_HEADER) + "\n")


def from_csv(path, ranks: int, microbatches: int, chunks: int = 1, name: str | None = None,
             stage_to_rank: Iterable[int] | None = None) -> Schedule:
    """Read a CSV written by `to_csv`. The stage map defaults to s % ranks (interleaved layout).

    Checks the file's format (header, integers, per-rank indices 0, 1, … in order) and raises
    DataError naming the line; it does not validate dependencies (call `validate`).
    """
    from harness.schedule import Action, Schedule, _interleaved_map

    path = Path(path)
    text = path.read_text()
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
        raise DataError(f"{path}: first line must be the header {','.join(CSV_HEADER)!r}, "
                        f"got {','.join(header or [])!r}")
    lists: list = [[] for _ in range(ranks)]
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 5:
            raise DataError(f"{path}:{lineno}: expected 5 fields, got {len(row)}: {row}")
        try:
            r, i, st, mb = int(row[0]), int(row[1]), int(row[3]), int(row[4])
        except ValueError:
            raise DataError(f"{path}:{lineno}: rank, index, stage, microbatch must be integers: "
                            f"{row}") from None
        kind = row[2].strip()
        if not 0 <= r < ranks:
            raise DataError(f"{path}:{lineno}: rank {r} outside [0, {ranks})")
        if i != len(lists[r]):
            raise DataError(f"{path}:{lineno}: rank {r} index {i}, expected {len(lists[r])}")
        lists[r].append(Action(kind, st, mb))
    s_map = tuple(stage_to_rank) if stage_to_rank is not None else _interleaved_map(ranks, chunks)
    return Schedule(name or path.stem, ranks, microbatches, chunks, s_map,
                    tuple(tuple(a) for a in lists))


def to_json(s: Schedule) -> str:
    """JSON text: name, ranks, microbatches, chunks, stage_to_rank and per rank [kind, stage, mb]."""
    return json.dumps({
        "name": s.name, "ranks": s.ranks, "microbatches": s.microbatches, "chunks": s.chunks,
        "stage_to_rank": list(s.stage_to_rank),
        "actions": [[[a.kind, a.stage, a.microbatch] for a in acts] for acts in s.actions],
    })


def from_json(text) -> Schedule:
    """Inverse of `to_json` (accepts the JSON text or the decoded dict)."""
    from harness.schedule import Action, Schedule

    d = json.loads(text) if isinstance(text, (str, bytes)) else text
    try:
        return Schedule(str(d["name"]), int(d["ranks"]), int(d["microbatches"]), int(d["chunks"]),
                        tuple(int(x) for x in d["stage_to_rank"]),
                        tuple(tuple(Action(str(k), int(st), int(mb)) for k, st, mb in acts)
                              for acts in d["actions"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"schedule JSON is malformed: {exc!r}") from None
