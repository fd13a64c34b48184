"""Property tests of harness/schedule.py (hypothesis): for random valid (schedule, P, M, V) every
generated schedule validates, orders each micro-batch's F before its B/BW before its W, has the
right counts, stays within the documented peak in-flight bound, and simulates to a bubble >= 0
that equals the closed form where the closed form is exact; the validator rejects every single
mutation of a valid schedule that breaks it (a dropped, duplicated, reordered, misplaced or
out-of-range action) with a ScheduleError naming the place, and never raises anything else.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import schedule as sc

# database=None: no example database in the working tree; examples are drawn afresh each run
SETTINGS = settings(max_examples=120, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layouts(draw, names=sc.NAMES):
    """(name, P, M, V) that the generators accept."""
    name = draw(st.sampled_from(names))
    P = draw(st.integers(1, 6))
    if name == "interleaved":
        V = draw(st.integers(1, 3))
        M = P * draw(st.integers(1, 3))  # groups of P micro-batches
    else:
        V = 1
        M = draw(st.integers(1, 12))
    return name, P, M, V


def _position(s: sc.Schedule) -> dict:
    """(kind, stage, mb) -> (rank, index)."""
    return {(a.kind, a.stage, a.microbatch): (r, i)
            for r, acts in enumerate(s.actions) for i, a in enumerate(acts)}


@SETTINGS
@given(layouts())
def test_generated_schedules_validate_with_the_right_counts_and_order(layout):
    name, P, M, V = layout
    s = sc.generate(name, P, M, V)
    sc.validate(s)
    assert (s.ranks, s.microbatches, s.chunks, s.stages) == (P, M, V, P * V)
    pos = _position(s)
    split = name == "zb-h1"
    for r, acts in enumerate(s.actions):
        assert len(acts) == (3 * M if split else 2 * M * V)
        assert len(set(acts)) == len(acts)
        assert all(s.stage_to_rank[a.stage] == r for a in acts)
    for stage in range(s.stages):
        for mb in range(M):
            rank, f = pos[("F", stage, mb)]
            assert rank == s.stage_to_rank[stage]
            if split:
                assert ("BW", stage, mb) not in pos
                rb, b = pos[("B", stage, mb)]
                rw, w = pos[("W", stage, mb)]
                assert rank == rb == rw and f < b < w
            else:
                assert ("B", stage, mb) not in pos and ("W", stage, mb) not in pos
                rb, b = pos[("BW", stage, mb)]
                assert rank == rb and f < b
    # a micro-batch's forward moves down the stages and its backward back up
    sim = sc.simulate(s)
    done = {(iv.kind, iv.stage, iv.microbatch): iv for ivs in sim.intervals for iv in ivs}
    for stage in range(1, s.stages):
        for mb in range(M):
            assert done[("F", stage - 1, mb)].end <= done[("F", stage, mb)].start
            back = "B" if split else "BW"
            assert done[(back, stage, mb)].end <= done[(back, stage - 1, mb)].start


@SETTINGS
@given(layouts())
def test_peak_in_flight_within_the_documented_bound(layout):
    """FACTS.md: GPipe holds M on every rank, 1F1B P−r on rank r, ZB-H1 at most P, interleaved
    rank r at most its warm-up 2(P−r−1)+(V−1)P plus one chunk activation sets."""
    name, P, M, V = layout
    peak = sc.peak_in_flight(sc.generate(name, P, M, V))
    assert len(peak) == P and all(p >= 1 for p in peak)
    for r, p in enumerate(peak):
        if name == "gpipe":
            assert p == M
        elif name == "1f1b":
            assert p == min(P - r, M)
        elif name == "zb-h1":
            assert p == min(P, M)
        else:
            assert p <= min(M * V, 2 * (P - r - 1) + (V - 1) * P + 1)
    if name == "interleaved":
        assert peak[0] == min(M * V, V * P + P - 1)


durations = st.floats(0.05, 5.0, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(layouts(), durations, durations, durations, st.floats(0.0, 2.0))
def test_simulated_bubble_is_a_share_and_busy_time_adds_up(layout, f, b, w, comm):
    name, P, M, V = layout
    s = sc.generate(name, P, M, V)
    sim = sc.simulate(s, f, b, w, comm)
    cost = {"F": f, "B": b, "W": w, "BW": b + w}
    for r, acts in enumerate(s.actions):
        assert sim.busy[r] == pytest.approx(sum(cost[a.kind] for a in acts), rel=1e-9)
        assert sim.busy[r] <= sim.makespan * (1 + 1e-12)
        ivs = sim.intervals[r]
        assert all(x.end <= y.start + 1e-9 for x, y in zip(ivs, ivs[1:]))  # one at a time
    assert -1e-12 <= sim.bubble < 1
    assert sim.bubble_of_compute >= -1e-12
    # the two conventions describe the same idle time
    assert sim.bubble == pytest.approx(sim.bubble_of_compute / (1 + sim.bubble_of_compute),
                                       abs=1e-9)
    if P == 1 and comm == 0:
        assert sim.bubble == pytest.approx(0.0, abs=1e-12)


@SETTINGS
@given(layouts())
def test_simulated_bubble_equals_theory_where_theory_is_exact(layout):
    """Equal passes (F = B = W), no communication cost: every family's closed form is exact,
    except ZB-H1 with M < P (the paper's formula assumes M >= P: then it lies between ZB-H1's
    formula and 1F1B's)."""
    name, P, M, V = layout
    sim = sc.simulate(sc.generate(name, P, M, V))
    theory = sc.theoretical_bubble(name, P, M, V)
    if name == "zb-h1" and M < P:
        assert theory.of_step - 1e-12 <= sim.bubble
        assert sim.bubble <= sc.theoretical_bubble("1f1b", P, M).of_step + 1e-12
    else:
        assert sim.bubble == pytest.approx(theory.of_step, abs=1e-12)
        assert sim.bubble_of_compute == pytest.approx(theory.of_compute, abs=1e-12)


@SETTINGS
@given(layouts(names=("gpipe", "1f1b")), durations, durations, durations)
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_whatever_the_passes(layout, f, b, w):
    name, P, M, _ = layout
    sim = sc.simulate(sc.generate(name, P, M), f, b, w)
    assert sim.bubble_of_compute == pytest.approx((P - 1) / M, rel=1e-9, abs=1e-12)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 12), durations, durations, st.data())
def test_zb_h1_bubble_equals_theory_when_w_fits_in_f_and_b(P, M, f, b, data):
    """The paper's (P−1)(F+B−W) idle per rank holds for M >= P and W <= min(F, B). (W <= F
    alone is not enough: P=2, M=2, F=W=2, B=1 simulates to 1/6 of the step, the formula 1/11.)"""
    M = max(M, P)
    w = data.draw(st.floats(0.0, min(f, b)), label="w")
    sim = sc.simulate(sc.zb_h1(P, M), f, b, w)
    theory = sc.theoretical_bubble("zb-h1", P, M, f=f, b=b, w=w)
    assert sim.bubble == pytest.approx(theory.of_step, rel=1e-9, abs=1e-12)


@SETTINGS
@given(layouts())
def test_csv_round_trip(tmp_path_factory, layout):
    name, P, M, V = layout
    s = sc.generate(name, P, M, V)
    path = tmp_path_factory.mktemp("csv") / "s.csv"
    sc.to_csv(s, path)
    back = sc.from_csv(path, P, M, V, name=name)
    assert back.actions == s.actions and back.stage_to_rank == s.stage_to_rank
    sc.validate(back)


# ---- mutations --------------------------------------------------------------------------------

# what the validator must say for each kind of mutation (the message names a rank or a stage)
MESSAGES = {
    "drop": r"missing (F|BW or B/W|W) for stage \d+ mb \d+|has not run on rank \d+|"
            r"no earlier B\(stage=\d+, mb=\d+\)",
    "duplicate": r"rank \d+ action \d+ .*: (duplicate of action \d+ on rank \d+|"
                 r"its F\(stage=\d+, mb=\d+\) has not run|no earlier B|already has a)",
    "after_its_successor": r"rank \d+ action \d+ .*: (its F\(stage=\d+, mb=\d+\) has not run|"
                           r"no earlier B\(stage=\d+, mb=\d+\))",
    # the moved action's rank is checked first, or its old rank misses it first
    "wrong_rank": r"rank \d+ action \d+ .*: (stage \d+ belongs to rank \d+, not rank \d+|"
                  r"its F\(stage=\d+, mb=\d+\) has not run|no earlier B)|missing",
    "microbatch_out_of_range": r"rank \d+ action \d+ .*: micro-batch outside \[0, \d+\)",
    "stage_out_of_range": r"rank \d+ action \d+ .*: stage outside \[0, \d+\)",
    "unknown_kind": r"rank \d+ action \d+ .*: unknown kind 'X'",
    "fuse_split": r"already has a|missing|no earlier B|has not run",
}


def _with(s: sc.Schedule, lists) -> sc.Schedule:
    return replace(s, actions=tuple(tuple(a) for a in lists))


@st.composite
def mutations(draw):
    """A valid schedule and one mutation that breaks it: (mutated schedule, mutation name)."""
    name, P, M, V = draw(layouts())
    s = sc.generate(name, P, M, V)
    lists = [list(a) for a in s.actions]
    r = draw(st.integers(0, P - 1), label="rank")
    i = draw(st.integers(0, len(lists[r]) - 1), label="index")
    a = lists[r][i]
    kinds = ["drop", "duplicate", "microbatch_out_of_range", "stage_out_of_range",
             "unknown_kind", "after_its_successor"]
    if P > 1:
        kinds.append("wrong_rank")
    if a.kind in ("BW", "W"):
        kinds.append("fuse_split")
    kind = draw(st.sampled_from(kinds), label="mutation")
    if kind == "drop":
        del lists[r][i]
    elif kind == "duplicate":
        lists[r].insert(draw(st.integers(0, len(lists[r])), label="at"), a)
    elif kind == "microbatch_out_of_range":
        lists[r][i] = sc.Action(a.kind, a.stage, draw(st.sampled_from([-1, M, M + 3])))
    elif kind == "stage_out_of_range":
        lists[r][i] = sc.Action(a.kind, draw(st.sampled_from([-1, s.stages, s.stages + 2])),
                                a.microbatch)
    elif kind == "unknown_kind":
        lists[r][i] = sc.Action("X", a.stage, a.microbatch)
    elif kind == "wrong_rank":
        other = draw(st.sampled_from([q for q in range(P) if q != r]), label="to rank")
        del lists[r][i]
        lists[other].insert(draw(st.integers(0, len(lists[other])), label="at"), a)
    elif kind == "after_its_successor":
        # swap the action with the one of the same (stage, mb) that must follow it
        pred = {"F": ("BW", "B"), "B": ("W",)}.get(a.kind, ())
        later = [j for j, b in enumerate(lists[r]) if (b.stage, b.microbatch) ==
                 (a.stage, a.microbatch) and b.kind in pred]
        if not later:  # a BW or a W has no successor: swap with its predecessor instead
            before = {"BW": "F", "W": "B"}[a.kind]
            j = next(j for j, b in enumerate(lists[r]) if (b.kind, b.stage, b.microbatch) ==
                     (before, a.stage, a.microbatch))
        else:
            j = later[0]
        lists[r][i], lists[r][j] = lists[r][j], lists[r][i]
    elif kind == "fuse_split":
        # a BW split into B+W next to it, or a W turned into a BW: one action of each pair twice
        if a.kind == "BW":
            lists[r][i:i + 1] = [sc.Action("BW", a.stage, a.microbatch),
                                 sc.Action("W", a.stage, a.microbatch)]
        else:
            lists[r][i] = sc.Action("BW", a.stage, a.microbatch)
    return _with(s, lists), kind


@settings(SETTINGS, max_examples=400)
@given(mutations())
def test_validator_rejects_every_single_breaking_mutation(case):
    mutated, kind = case
    with pytest.raises(sc.ScheduleError) as exc:
        sc.validate(mutated)
    assert re.search(MESSAGES[kind], str(exc.value)), f"{kind}: {exc.value}"


@SETTINGS
@given(layouts(), st.data())
def test_validator_accepts_or_explains_any_swap(layout, data):
    """Swapping two actions of one rank may keep a schedule valid (two independent forwards) or
    break it (an order or a deadlock): validate either passes or raises ScheduleError."""
    name, P, M, V = layout
    s = sc.generate(name, P, M, V)
    r = data.draw(st.integers(0, P - 1))
    n = len(s.actions[r])
    i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    lists = [list(a) for a in s.actions]
    lists[r][i], lists[r][j] = lists[r][j], lists[r][i]
    try:
        sc.validate(_with(s, lists))
    except sc.ScheduleError as e:
        assert re.search(r"rank \d+|stage \d+", str(e)), str(e)


def test_a_cross_rank_deadlock_is_named():
    """1F1B on 2 ranks with rank 1 running its backward before its forward arrives is caught
    by the message-flow simulation, not by the per-rank order checks."""
    s = sc.one_f_one_b(2, 2)
    lists = [list(a) for a in s.actions]
    # rank 0 runs micro-batch 1 first and waits for its gradient; rank 1 waits for the
    # activation of micro-batch 0, which rank 0 only sends after that gradient: each waits
    lists[0] = [sc.Action("F", 0, 1), sc.Action("BW", 0, 1), sc.Action("F", 0, 0),
                sc.Action("BW", 0, 0)]
    lists[1] = [sc.Action("F", 1, 0), sc.Action("BW", 1, 0), sc.Action("F", 1, 1),
                sc.Action("BW", 1, 1)]
    with pytest.raises(sc.ScheduleError, match=r"deadlock: rank \d action \d"):
        sc.validate(_with(s, lists))
