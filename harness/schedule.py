"""Pipeline schedules as data: generate, validate, simulate, dump, load and draw them.

A schedule is, for every rank, an ordered list of actions F / BW / B / W on (virtual stage,
micro-batch). Communication is implicit: the C executor derives sends and receives from the lists
it reads (the CSV written by `to_csv`). Dumping and loading (CSV, JSON) live in
`harness.schedule_io` and are re-exported here. This module holds no timing of real runs (see
`harness.timeline`) and no command-line code (see `harness.schedule_cli`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from harness.errors import ConfigError
# dump and load (the executor's CSV, JSON) live in harness.schedule_io; re-exported here
from harness.schedule_io import (CSV_HEADER, from_csv, from_json, to_csv,  # noqa: F401
                                 to_json, to_rows)

KINDS = ("F", "BW", "B", "W")
NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1")


class ScheduleError(ConfigError):
    """A schedule (or the request for one) is invalid; the message names the rank and action.

    It is a ValueError (and a ConfigError, so the CLI exits 2 on it).
    """


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One unit of work on one rank.

    kind: "F" forward; "BW" fused backward (input + weight gradient); "B" input gradient only;
    "W" weight gradient only (after the B of the same stage and micro-batch, on the same rank).
    stage: virtual stage index in [0, S). microbatch: index in [0, M).
    """

    kind: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}(stage={self.stage}, mb={self.microbatch})"


@dataclass(frozen=True)
class Schedule:
    """P ranks, M micro-batches, V chunks per rank, S = P·V virtual stages.

    stage_to_rank[s] is the rank that owns virtual stage s (length S); actions[r] is rank r's
    ordered tuple of actions (length P).
    """

    name: str
    ranks: int
    microbatches: int
    chunks: int
    stage_to_rank: tuple
    actions: tuple

    @property
    def stages(self) -> int:
        """Number of virtual stages S."""
        return len(self.stage_to_rank)


def _interleaved_map(P: int, V: int) -> tuple:
    # virtual stage s lives on rank s % P: rank r holds r, r+P, r+2P, ...
    return tuple(s % P for s in range(P * V))


def _check_sizes(name: str, P: int, M: int, V: int = 1) -> None:
    for label, value in (("ranks P", P), ("microbatches M", M), ("chunks V", V)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{name}: {label} must be an integer >= 1, got {value!r}")


def _make(name: str, P: int, M: int, V: int, lists: list) -> Schedule:
    return Schedule(name, P, M, V, _interleaved_map(P, V), tuple(tuple(a) for a in lists))


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


def gpipe(P: int, M: int) -> Schedule:
    """GPipe: every rank runs all M forwards, then all M fused backwards (micro-batch order)."""
    _check_sizes("gpipe", P, M)
    lists = []
    for r in range(P):
        lists.append([Action("F", r, m) for m in range(M)] + [Action("BW", r, m) for m in range(M)])
    return _make("gpipe", P, M, 1, lists)


def one_f_one_b(P: int, M: int) -> Schedule:
    """1F1B (PipeDream-Flush): rank r runs min(P−r−1, M) warm-up forwards, then alternates one
    forward and one fused backward, then drains the remaining backwards."""
    _check_sizes("1f1b", P, M)
    lists = []
    for r in range(P):
        warmup = min(P - r - 1, M)
        acts = [Action("F", r, m) for m in range(warmup)]
        for i in range(M - warmup):
            acts += [Action("F", r, warmup + i), Action("BW", r, i)]
        acts += [Action("BW", r, m) for m in range(M - warmup, M)]
        lists.append(acts)
    return _make("1f1b", P, M, 1, lists)


def interleaved(P: int, M: int, V: int) -> Schedule:
    """Megatron-style interleaved 1F1B: rank r holds virtual stages r, r+P, …, r+(V−1)P.

    Work is taken depth-first over groups of P micro-batches: the k-th forward on a rank is
    micro-batch (k // PV)·P + k % P on local chunk (k % PV) // P; backwards walk the chunks in
    reverse. Warm-up is min(2(P−r−1) + (V−1)·P, M·V) forwards, then 1F1B, then the drain.
    Requires M % P == 0 (each group must hold exactly P micro-batches).
    """
    _check_sizes("interleaved", P, M, V)
    if M % P != 0:
        raise ScheduleError(
            f"interleaved: microbatches M={M} must be a multiple of ranks P={P} "
            f"(work goes depth-first over groups of P micro-batches); "
            f"HINT: try M={P * max(1, round(M / P))}"
        )
    total = M * V

    def action(k: int, kind: str, r: int) -> Action:
        in_group = k % (P * V)
        chunk = in_group // P
        if kind != "F":
            chunk = V - 1 - chunk
        mb = (k // (P * V)) * P + k % P
        return Action(kind, chunk * P + r, mb)

    lists = []
    for r in range(P):
        warmup = min(2 * (P - r - 1) + (V - 1) * P, total)
        acts = [action(k, "F", r) for k in range(warmup)]
        for i in range(total - warmup):
            acts += [action(warmup + i, "F", r), action(i, "BW", r)]
        acts += [action(k, "BW", r) for k in range(total - warmup, total)]
        lists.append(acts)
    return _make("interleaved", P, M, V, lists)


def zb_h1(P: int, M: int) -> Schedule:
    """ZB-H1 (zero-bubble paper, Qi et al. 2023): 1F1B with the backward split into B (input
    gradient, on the critical path) and W (weight gradient, free to move).

    Rank r keeps 1F1B's order of F and B (warm-up min(P−r−1, M) forwards) and keeps at most r W
    passes deferred: after each B it runs the oldest pending W once more than r are pending, and
    flushes the rest at the end. In the steady state that is "run W when P micro-batches are in
    flight", so every rank peaks at min(P, M) micro-batches (1F1B's rank-0 peak), and the r
    deferred W passes fill rank r's drain bubble: (P−1)(F+B−W) idle per rank for M ≥ P.
    """
    _check_sizes("zb-h1", P, M)
    lists = []
    for r in range(P):
        warmup = min(P - r - 1, M)
        acts = [Action("F", r, m) for m in range(warmup)]
        pending: deque = deque()  # micro-batches whose B ran and whose W has not

        def backward(m: int) -> None:
            acts.append(Action("B", r, m))
            pending.append(m)
            if len(pending) > r:
                acts.append(Action("W", r, pending.popleft()))

        for i in range(M - warmup):
            acts.append(Action("F", r, warmup + i))
            backward(i)
        for m in range(M - warmup, M):
            backward(m)
        acts += [Action("W", r, m) for m in pending]
        lists.append(acts)
    return _make("zb-h1", P, M, 1, lists)


def generate(name: str, P: int, M: int, V: int = 1) -> Schedule:
    """Build the named schedule. name ∈ NAMES; V (chunks per rank) is used by "interleaved" only
    and must be 1 for the others."""
    if name == "interleaved":
        return interleaved(P, M, V)
    if name not in NAMES:
        raise ScheduleError(f"unknown schedule {name!r}; allowed: {', '.join(NAMES)}")
    if V != 1:
        raise ScheduleError(f"{name}: chunks V={V} is only meaningful for 'interleaved'; use V=1")
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1}[name](P, M)


# --------------------------------------------------------------------------------------------
# Dependencies and the message-flow simulation (shared by validate and simulate)
# --------------------------------------------------------------------------------------------


def _key(kind: str, stage: int, mb: int) -> tuple:
    """What an action produces: ("F", s, mb), ("B", s, mb) for a B or a BW (both produce the
    input-gradient), or ("W", s, mb)."""
    return ("B" if kind in ("B", "BW") else kind, stage, mb)


def _dependencies(s: Schedule, a: Action) -> list:
    """(key, what) for each input `a` needs; each key is produced by exactly one action."""
    if a.kind == "F":
        return [(("F", a.stage - 1, a.microbatch), "activation")] if a.stage > 0 else []
    if a.kind in ("B", "BW"):
        deps = [(("F", a.stage, a.microbatch), "own forward")]
        if a.stage < s.stages - 1:
            deps.append((("B", a.stage + 1, a.microbatch), "input-gradient"))
        return deps
    return [(("B", a.stage, a.microbatch), "input-gradient pass")]  # W


def _flow(s: Schedule, duration=None, comm: float = 0.0) -> tuple:
    """Walk every rank's list in order; a rank advances while its next action's inputs exist.

    With `duration` (kind -> time) also computes start/end times: an action starts at
    max(rank free, inputs ready), a cross-rank input being ready `comm` after its producer ends.
    Returns (end time per produced key, intervals per rank). Raises ScheduleError on deadlock.
    """
    P = s.ranks
    where = {}  # produced key -> (rank, index, action)
    for r, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            where[_key(a.kind, a.stage, a.microbatch)] = (r, i, a)
    done: dict = {}  # key -> end time
    pc = [0] * P
    clock = [0.0] * P
    intervals: list = [[] for _ in range(P)]
    progress = True
    while progress:
        progress = False
        for r in range(P):
            acts = s.actions[r]
            while pc[r] < len(acts):
                a = acts[pc[r]]
                ready = clock[r]
                blocked = False
                for k, _ in _dependencies(s, a):
                    if k not in done:
                        blocked = True
                        break
                    src = where[k][0]
                    ready = max(ready, done[k] + (comm if src != r else 0.0))
                if blocked:
                    break
                end = ready + (duration(a) if duration else 0.0)
                done[_key(a.kind, a.stage, a.microbatch)] = end
                intervals[r].append(Interval(a.kind, a.stage, a.microbatch, ready, end))
                clock[r] = end
                pc[r] += 1
                progress = True
    stuck = [r for r in range(P) if pc[r] < len(s.actions[r])]
    if stuck:
        parts = []
        for r in stuck:
            a = s.actions[r][pc[r]]
            for k, what in _dependencies(s, a):
                if k in done:
                    continue
                if k not in where:
                    need = f"{'F' if k[0] == 'F' else 'B/BW'}(stage={k[1]}, mb={k[2]})"
                    parts.append(f"rank {r} action {pc[r]} {a} waits for the {what} of {need}, "
                                 f"which no rank ever runs (unmatched receive)")
                    break
                src, idx, producer_action = where[k]
                place = f"its own action {idx}, later in its list" if src == r \
                    else f"action {idx} on rank {src}"
                parts.append(f"rank {r} action {pc[r]} {a} waits for the {what} from "
                             f"{producer_action} ({place})")
                break
        raise ScheduleError("deadlock: " + "; ".join(parts))
    return done, intervals


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate(s: Schedule) -> None:
    """Raise ScheduleError unless `s` is complete, consistent and deadlock-free.

    Checks, in order: shapes (P lists, stage map of length S onto [0, P)); per action, in list
    order: known kind, stage and micro-batch in range, stage owned by this rank, no duplicate,
    B/BW after its F, W after its B, no BW mixed with B/W; then every (stage, mb) has one F and one
    BW or one B+W pair; last, the message-flow simulation (buffered sends) must finish.
    """
    P, M = s.ranks, s.microbatches
    if P < 1 or M < 1 or s.chunks < 1:
        raise ScheduleError(f"ranks, microbatches and chunks must be >= 1, got P={P}, M={M}, "
                            f"V={s.chunks}")
    if len(s.actions) != P:
        raise ScheduleError(f"{len(s.actions)} action lists for {P} ranks")
    if len(s.stage_to_rank) != P * s.chunks:
        raise ScheduleError(f"stage_to_rank has {len(s.stage_to_rank)} entries, expected "
                            f"P·V = {P * s.chunks}")
    for st, owner in enumerate(s.stage_to_rank):
        if not 0 <= owner < P:
            raise ScheduleError(f"stage {st} is mapped to rank {owner}, outside [0, {P})")
    S = s.stages
    seen: dict = {}  # (kind, stage, mb) -> (rank, index)
    for r, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            where = f"rank {r} action {i} {a}"
            if a.kind not in KINDS:
                raise ScheduleError(f"{where}: unknown kind {a.kind!r}; allowed: {', '.join(KINDS)}")
            if not 0 <= a.stage < S:
                raise ScheduleError(f"{where}: stage outside [0, {S})")
            if not 0 <= a.microbatch < M:
                raise ScheduleError(f"{where}: micro-batch outside [0, {M})")
            owner = s.stage_to_rank[a.stage]
            if owner != r:
                raise ScheduleError(f"{where}: stage {a.stage} belongs to rank {owner}, "
                                    f"not rank {r} (wrong rank)")
            me = (a.kind, a.stage, a.microbatch)
            if me in seen:
                pr, pi = seen[me]
                raise ScheduleError(f"{where}: duplicate of action {pi} on rank {pr}")
            f = ("F", a.stage, a.microbatch)
            if a.kind in ("B", "BW") and f not in seen:
                raise ScheduleError(f"{where}: its F(stage={a.stage}, mb={a.microbatch}) has not "
                                    f"run on rank {r}")
            if a.kind == "W" and ("B", a.stage, a.microbatch) not in seen:
                raise ScheduleError(f"{where}: no earlier B(stage={a.stage}, mb={a.microbatch}) "
                                    f"on rank {r} (W needs its input-gradient pass first)")
            other = {"BW": ("B", "W"), "B": ("BW",), "W": ("BW",)}.get(a.kind, ())
            for ok in other:
                if (ok, a.stage, a.microbatch) in seen:
                    raise ScheduleError(f"{where}: stage {a.stage} mb {a.microbatch} already has "
                                        f"a {ok}; use either one BW or one B+W pair")
            seen[me] = (r, i)
    for st in range(S):
        for mb in range(M):
            if ("F", st, mb) not in seen:
                raise ScheduleError(f"missing F for stage {st} mb {mb} "
                                    f"(rank {s.stage_to_rank[st]})")
            has_bw = ("BW", st, mb) in seen
            has_b, has_w = ("B", st, mb) in seen, ("W", st, mb) in seen
            if not (has_bw or (has_b and has_w)):
                lack = "W" if has_b else "BW or B/W"
                raise ScheduleError(f"missing {lack} for stage {st} mb {mb} "
                                    f"(rank {s.stage_to_rank[st]})")
    _flow(s)


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


class Interval(NamedTuple):
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """Result of `simulate`. Times are in the caller's unit (the unit of f, b, w, comm).

    intervals[r]: rank r's actions with start/end. busy[r]: rank r's compute time.
    bubble: 1 − Σ busy / (P · makespan), the idle share of the step (the engine's definition).
    bubble_of_compute: idle time ÷ busy time = P · makespan / Σ busy − 1 (the papers' convention).
    peak_in_flight[r]: most activation sets held at once on rank r (one per (stage, mb) whose F
    has started and whose BW or W has not finished; chunks count separately).
    """

    intervals: tuple
    makespan: float
    busy: tuple
    bubble: float
    bubble_of_compute: float
    peak_in_flight: tuple


def peak_in_flight(s: Schedule) -> tuple:
    """Per rank, the most activation sets held at once (order-only: a rank runs one action at a
    time, so this does not depend on durations). Divide by V for full-model micro-batches."""
    peaks = []
    for acts in s.actions:
        held = peak = 0
        for a in acts:
            if a.kind == "F":
                held += 1
                peak = max(peak, held)
            elif a.kind in ("BW", "W"):
                held -= 1
        peaks.append(peak)
    return tuple(peaks)


def simulate(s: Schedule, f=1.0, b=1.0, w=1.0, comm: float = 0.0) -> Simulation:
    """Event simulation of `s` with per-action durations per virtual stage (one chunk: with V
    chunks per rank, pass a full rank's time divided by V): F = f, B = b, W = w, BW = b + w;
    a message between different ranks arrives `comm` after its producer ends (same rank: 0).
    f, b, w are each one number for every stage or a sequence of S numbers, one per virtual
    stage (unequal stages: the last one holding the LM head, harness.simulate's cost model).
    Raises ScheduleError if the schedule deadlocks (validate first for better messages)."""
    per_stage = {}
    for label, value in (("f", f), ("b", b), ("w", w)):
        seq = tuple(value) if isinstance(value, (list, tuple)) else (value,) * s.stages
        if len(seq) != s.stages:
            raise ScheduleError(f"simulate: {label} has {len(seq)} per-stage durations, the "
                                f"schedule has S = {s.stages} virtual stages")
        per_stage[label] = seq
    for label, value in [(k, x) for k, seq in per_stage.items() for x in seq] + [("comm", comm)]:
        if not (value >= 0 and math.isfinite(value)):
            raise ScheduleError(f"simulate: duration {label}={value!r} must be finite and >= 0")
    fs, bs, ws = per_stage["f"], per_stage["b"], per_stage["w"]
    cost = {"F": fs, "B": bs, "W": ws, "BW": tuple(x + y for x, y in zip(bs, ws))}
    _, intervals = _flow(s, lambda a: cost[a.kind][a.stage], comm)
    makespan = max((iv[-1].end for iv in intervals if iv), default=0.0)
    busy = tuple(sum(x.end - x.start for x in iv) for iv in intervals)
    total = sum(busy)
    bubble = 1.0 - total / (s.ranks * makespan) if makespan > 0 else 0.0
    of_compute = s.ranks * makespan / total - 1.0 if total > 0 else 0.0
    return Simulation(tuple(tuple(iv) for iv in intervals), makespan, busy, bubble, of_compute,
                      peak_in_flight(s))


@dataclass(frozen=True)
class Bubble:
    """A theoretical bubble in both conventions (equal stage times, no communication cost).

    of_compute: idle time ÷ ideal compute time (the papers' convention, e.g. (P−1)/M for 1F1B).
    of_step: idle time ÷ (P × step time) (Tandem's measured definition, e.g. (P−1)/(M+P−1)).
    They relate as of_step = of_compute / (1 + of_compute). `formula` spells out of_compute.
    """

    of_compute: float
    of_step: float
    formula: str


def theoretical_bubble(name: str, P: int, M: int, V: int = 1, f: float = 1.0, b: float = 1.0,
                       w: float = 1.0) -> Bubble:
    """Closed-form bubble of the named schedule (see FACTS.md).

    gpipe, 1f1b: (P−1)/M of ideal compute; interleaved: (P−1)/(V·M); zb-h1:
    (P−1)(f+b−w)/(M(f+b+w)), i.e. (P−1)/(3M) when f = b = w (the paper's figure, for M ≥ P).
    f, b, w matter for zb-h1 only.
    """
    _check_sizes(name, P, M, V)
    if name in ("gpipe", "1f1b"):
        x, formula = (P - 1) / M, "(P-1)/M"
    elif name == "interleaved":
        x, formula = (P - 1) / (V * M), "(P-1)/(V*M)"
    elif name == "zb-h1":
        x, formula = (P - 1) * (f + b - w) / (M * (f + b + w)), "(P-1)(F+B-W)/(M(F+B+W))"
    else:
        raise ScheduleError(f"unknown schedule {name!r}; allowed: {', '.join(NAMES)}")
    return Bubble(x, x / (1.0 + x), formula)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

LEGEND_SYMBOLS = {"F": "F", "B": "B", "W": "W", "BW": "b"}


def legend(s: Schedule) -> str:
    """One line explaining the cells `chart` prints."""
    text = "F3 forward of mb 3, b3 fused backward (B+W), B3 input-gradient, W3 weight-gradient"
    if s.chunks > 1:
        text += "; .c suffix = local chunk c (F3.1: mb 3 on the rank's chunk 1)"
    return text + "; . idle"


def _label(s: Schedule, kind: str, stage: int, mb: int) -> str:
    label = f"{LEGEND_SYMBOLS.get(kind, kind)}{mb}"
    if s.chunks > 1:
        label += f".{stage // s.ranks}" if s.stage_to_rank == _interleaved_map(s.ranks, s.chunks) \
            else f".s{stage}"
    return label


def chart(s: Schedule, sim: Simulation | None = None, max_columns: int = 400) -> str:
    """A text chart, one line per rank, after a legend line.

    Without `sim`: the actions in list order. With `sim`: time-aligned, one column per time unit
    (the shortest action, coarsened so a line has at most `max_columns` cells); an action spans
    its duration (label then '-'), idle cells are dots. Cells are rounded to whole columns.
    """
    width = max((len(_label(s, a.kind, a.stage, a.microbatch))
                 for acts in s.actions for a in acts), default=1) + 1
    lines = [legend(s)]
    if sim is None:
        for r, acts in enumerate(s.actions):
            cells = [_label(s, a.kind, a.stage, a.microbatch).ljust(width - 1) for a in acts]
            lines.append(f"rank {r} | " + " ".join(cells))
        return "\n".join(lines)
    durations = [x.end - x.start for iv in sim.intervals for x in iv if x.end > x.start]
    unit = min(durations, default=1.0)
    if sim.makespan / unit > max_columns:
        unit = sim.makespan / max_columns
    for r, iv in enumerate(sim.intervals):
        out, col = [], 0
        for x in iv:
            start = max(col, round(x.start / unit))
            end = max(start + 1, round(x.end / unit))
            out.append(("." * (width - 1) + " ") * (start - col))
            label = _label(s, x.kind, x.stage, x.microbatch)
            out.append(label.ljust((end - start) * width - 1, "-") + " ")
            col = end
        total_cols = max(col, round(sim.makespan / unit))
        out.append(("." * (width - 1) + " ") * (total_cols - col))
        lines.append(f"rank {r} | " + "".join(out).rstrip())
    return "\n".join(lines)
