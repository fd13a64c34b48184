"""Tests of harness.timeline on synthetic engine timelines: loading, Chrome trace events and the
measured bubble against values computed by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness import timeline as tl
from harness.errors import DataError

HEADER = "rank,step,kind,stage,microbatch,start_us,end_us"
BASE = 1_700_000_000_000  # MPI_Wtime-like offset in microseconds: times are absolute

# One step of 1F1B, P = 2, M = 1, times relative to BASE (µs).
#   rank 0: F 0-10, SEND 10-11, WAIT 11-41, BW 41-61, OPT 61-70, ALLREDUCE 70-80
#   rank 1: WAIT 0-11, RECV 10-11, F 11-21, BW 21-40, SEND 40-41, OPT 41-50
# window (compute + comm, no OPT/ALLREDUCE) 0-61 = 61; busy 10+20 + 10+19 = 59
# bubble = 1 - 59 / (2 * 61) = 63/122
STEP0 = {
    0: [("F", 0, 0, 0, 10), ("SEND", 0, 0, 10, 11), ("WAIT", 0, 0, 11, 41),
        ("BW", 0, 0, 41, 61), ("OPT", -1, -1, 61, 70), ("ALLREDUCE", -1, -1, 70, 80)],
    1: [("WAIT", 1, 0, 0, 11), ("RECV", 1, 0, 10, 11), ("F", 1, 0, 11, 21),
        ("BW", 1, 0, 21, 40), ("SEND", 1, 0, 40, 41), ("OPT", -1, -1, 41, 50)],
}
BUBBLE0 = 63 / 122


def write_timelines(directory, steps):
    """steps: list of (offset_us, {rank: [(kind, stage, mb, start, end), ...]}) -> CSV files."""
    lines = {r: [HEADER] for r in steps[0][1]}
    for step, (offset, per_rank) in enumerate(steps):
        for r, rows in per_rank.items():
            for kind, stage, mb, start, end in rows:
                lines[r].append(f"{r},{step},{kind},{stage},{mb},{BASE + offset + start},"
                                f"{BASE + offset + end}")
    for r, text in lines.items():
        (directory / f"timeline_rank{r}.csv").write_text("\n".join(text) + "\n")


def delayed(per_rank, extra):
    """The same step with rank 0's WAIT longer by `extra` µs and rank 0's later actions shifted."""
    rank0 = []
    for kind, stage, mb, start, end in per_rank[0]:
        if kind == "WAIT":
            end += extra
        elif start >= 41:
            start, end = start + extra, end + extra
        rank0.append((kind, stage, mb, start, end))
    return {**per_rank, 0: rank0}


def test_load_timelines(tmp_path):
    write_timelines(tmp_path, [(0, STEP0)])
    (tmp_path / "timeline_rank1.csv.bak").write_text("ignored")
    df = tl.load_timelines(tmp_path)
    assert list(df.columns) == tl.COLUMNS
    assert len(df) == 12
    assert sorted(df["rank"].unique()) == [0, 1]
    assert df.iloc[0]["kind"] == "F" and df.iloc[0]["start_us"] == BASE


def test_load_timelines_errors(tmp_path):
    with pytest.raises(DataError, match="no timeline_rank"):
        tl.load_timelines(tmp_path)
    (tmp_path / "timeline_rank0.csv").write_text(HEADER + "\n0,0,FWD,0,0,1,2\n")
    with pytest.raises(DataError, match=r"unknown kind\(s\) \['FWD'\]"):
        tl.load_timelines(tmp_path)
    (tmp_path / "timeline_rank0.csv").write_text("rank,step,kind\n0,0,F\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['stage'"):
        tl.load_timelines(tmp_path)
    (tmp_path / "timeline_rank0.csv").write_text(HEADER + "\n1,0,F,0,0,1,2\n")
    with pytest.raises(DataError, match="expected 0 from the file name"):
        tl.load_timelines(tmp_path)


def test_chrome_trace_events(tmp_path):
    write_timelines(tmp_path, [(0, STEP0)])
    trace = tl.to_chrome_trace(tl.load_timelines(tmp_path))
    events = trace["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    names = {(e["pid"], e["args"]["name"]) for e in meta if e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1")}
    threads = {(e["pid"], e["tid"], e["args"]["name"]) for e in meta if e["name"] == "thread_name"}
    assert (0, 0, "compute") in threads and (1, 1, "comm") in threads

    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == 12
    f1 = next(e for e in spans if e["name"] == "F mb0 s1")
    assert (f1["pid"], f1["tid"], f1["ts"], f1["dur"]) == (1, 0, 11.0, 10.0)
    assert f1["args"] == {"step": 0, "stage": 1, "mb": 0}
    bw0 = next(e for e in spans if e["name"] == "BW mb0 s0")
    assert (bw0["pid"], bw0["tid"], bw0["ts"], bw0["dur"]) == (0, 0, 41.0, 20.0)
    comm_names = sorted(e["name"] for e in spans if e["tid"] == 1)
    assert comm_names == ["ALLREDUCE", "RECV mb0 s1", "SEND mb0 s0", "SEND mb0 s1",
                          "WAIT mb0 s0", "WAIT mb0 s1"]
    opt = [e for e in spans if e["name"] == "OPT"]
    assert len(opt) == 2 and all(e["tid"] == 0 and e["args"]["stage"] is None for e in opt)
    assert min(e["ts"] for e in spans) == 0.0

    path = tl.write_chrome_trace(tl.load_timelines(tmp_path), tmp_path / "traces" / "t.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(trace))


def test_measured_bubble_by_hand(tmp_path):
    write_timelines(tmp_path, [(0, STEP0)])
    df = tl.load_timelines(tmp_path)
    assert tl.measured_bubble(df, step=0) == pytest.approx(BUBBLE0)
    assert tl.measured_bubble(df) == pytest.approx(BUBBLE0)  # one step: nothing left out


def test_measured_bubble_median_leaves_out_step_0(tmp_path):
    # step 0 slow (warm-up: rank 0 waits 100 µs more), steps 1..3 with extra waits of 0, 10, 30
    steps = [(0, delayed(STEP0, 100)), (1000, STEP0), (2000, delayed(STEP0, 10)),
             (3000, delayed(STEP0, 30))]
    write_timelines(tmp_path, steps)
    df = tl.load_timelines(tmp_path)
    per_step = tl.bubble_per_step(df)
    assert per_step[0] == pytest.approx(1 - 59 / (2 * 161))
    assert per_step[2] == pytest.approx(1 - 59 / (2 * 71))
    assert tl.measured_bubble(df, step=1) == pytest.approx(BUBBLE0)
    # median of steps 1, 2, 3 = step 2's value; step 0 would have pulled it up
    assert tl.measured_bubble(df) == pytest.approx(1 - 59 / (2 * 71))
    with pytest.raises(DataError, match="step 7 not in timeline"):
        tl.measured_bubble(df, step=7)


def test_opt_and_allreduce_do_not_count():
    rows = [(0, 0, "F", 0, 0, 0, 10), (0, 0, "OPT", -1, -1, 10, 1000),
            (1, 0, "F", 1, 0, 10, 20), (1, 0, "ALLREDUCE", -1, -1, 20, 5000)]
    df = pd.DataFrame(rows, columns=tl.COLUMNS)
    assert tl.measured_bubble(df) == pytest.approx(1 - 20 / (2 * 20))


def _replayed_timeline(name, P, M, f, b, w):
    """The timeline a runtime that adds nothing to the schedule would write: the simulator's own
    intervals (per-stage durations f, b, w), one step."""
    from harness import schedule as sched

    s = sched.generate(name, P, M)
    sim = sched.simulate(s, f=f, b=b, w=w)
    rows = [dict(rank=r, step=0, kind=iv.kind, stage=iv.stage, microbatch=iv.microbatch,
                 start_us=iv.start, end_us=iv.end)
            for r, ivs in enumerate(sim.intervals) for iv in ivs]
    return s, sim, pd.DataFrame(rows, columns=tl.COLUMNS)


@pytest.mark.parametrize("name", ["zb-h1", "1f1b"])
def test_stage_durations_replay_the_measured_bubble(name):
    """Fed the per-stage means of a timeline, the simulator gives back that timeline's bubble
    exactly; the equal-stage mean (what the bench simulated before) misses an unequal last stage
    (the LM head) by far."""
    from harness import schedule as sched
    from harness.bench_sides import stage_durations

    f, b, w = [100.0, 100.0, 100.0, 180.0], [120.0, 120.0, 120.0, 200.0], [80.0, 80, 80, 90]
    s, sim, df = _replayed_timeline(name, 4, 8, f, b, w)
    fs, bs, ws = stage_durations(df, s.stages)
    if name == "zb-h1":
        assert (fs, bs, ws) == (f, b, w)
    else:  # a fused BW: half to B, half to W
        assert fs == f and bs == ws == [(x + y) / 2 for x, y in zip(b, w)]
    measured = tl.measured_bubble(df, step=0)
    assert sched.simulate(s, f=fs, b=bs, w=ws).bubble == pytest.approx(measured, abs=1e-12)
    assert measured == pytest.approx(sim.bubble, abs=1e-12)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    flat = sched.simulate(s, f=mean(fs), b=mean(bs), w=mean(ws)).bubble
    assert measured - flat > 0.05, (measured, flat)


def test_stage_durations_fill_a_missing_stage_with_the_kind_mean():
    from harness.bench_sides import stage_durations

    df = pd.DataFrame([dict(rank=0, step=1, kind="F", stage=0, microbatch=0, start_us=0.0,
                            end_us=10.0),
                       dict(rank=1, step=1, kind="F", stage=1, microbatch=0, start_us=10.0,
                            end_us=40.0)], columns=tl.COLUMNS)
    f, b, w = stage_durations(df, 3)
    assert f == [10.0, 30.0, 20.0] and b == w == [0.0, 0.0, 0.0]


def test_bubble_per_rank_by_hand_and_its_mean_is_the_step_bubble():
    rows = [(0, 1, "F", 0, 0, 0.0, 4.0), (1, 1, "F", 1, 0, 4.0, 6.0),
            (1, 1, "WAIT", 1, 0, 0.0, 4.0), (0, 1, "WAIT", 0, 0, 4.0, 8.0),
            (1, 1, "B", 1, 0, 6.0, 8.0)]
    df = pd.DataFrame(rows, columns=tl.COLUMNS)
    per = tl.bubble_per_rank(df)
    # wall 8: rank 0 busy 4 -> 50% idle, rank 1 busy 4 -> 50% idle
    assert per.loc[1].tolist() == [0.5, 0.5]
    df.loc[4, "end_us"] = 7.0  # rank 1 busy 3 of the 8
    per = tl.bubble_per_rank(df)
    assert per.loc[1, 1] == pytest.approx(5 / 8)
    assert per.loc[1].mean() == pytest.approx(tl.bubble_per_step(df)[1])


def test_overlapping_actions_of_one_rank_count_once():
    # two stages of one rank ran at the same time (separate streams): F of stage 1 at 2-6
    # overlaps F of stage 5 at 4-9; busy is the union 2-9 = 7 of the window 0-10, not 4 + 5 = 9
    rows = [(0, 1, "WAIT", 1, 0, 0.0, 2.0), (0, 1, "F", 1, 0, 2.0, 6.0),
            (0, 1, "F", 5, 0, 4.0, 9.0), (0, 1, "SEND", 5, 0, 9.0, 10.0)]
    df = pd.DataFrame(rows, columns=tl.COLUMNS)
    assert tl.bubble_per_rank(df).loc[1, 0] == pytest.approx(0.3)
    assert tl.bubble_per_step(df)[1] == pytest.approx(0.3)
    # an action nested inside another adds nothing; disjoint ones add up
    df.loc[len(df)] = (0, 1, "W", 5, 0, 3.0, 5.0)
    assert tl.bubble_per_step(df)[1] == pytest.approx(0.3)
    df.loc[2, ["start_us", "end_us"]] = (7.0, 9.0)
    assert tl.bubble_per_step(df)[1] == pytest.approx(1 - 6 / 10)


@pytest.mark.parametrize("name", ["zb-h1", "gpipe"])
def test_replayed_timeline_per_rank_bubble_is_the_simulated_one(name):
    f, b, w = [100.0, 100.0, 100.0, 180.0], [120.0, 120.0, 120.0, 200.0], [80.0, 80, 80, 90]
    s, sim, df = _replayed_timeline(name, 4, 8, f, b, w)
    per = tl.bubble_per_rank(df).loc[0]
    want = [1.0 - busy / sim.makespan for busy in sim.busy]
    assert per.tolist() == pytest.approx(want, abs=1e-12)
    assert want[-1] < want[0]  # the heavy last stage idles least


def test_timed_bubble_replays_a_perfect_runtime_rank_by_rank(tmp_path):
    """bench's _timed_bubble on the timeline files a runtime adding nothing would write: measured
    and simulated agree, overall and for every rank (steps before first_timed left out)."""
    from types import SimpleNamespace

    from harness.bench_sides import _timed_bubble

    f, b, w = [100.0, 100.0, 100.0, 180.0], [120.0, 120.0, 120.0, 200.0], [80.0, 80, 80, 90]
    s, sim, df = _replayed_timeline("zb-h1", 4, 8, f, b, w)
    warm = df.assign(step=0, end_us=df["start_us"] + 3 * (df["end_us"] - df["start_us"]))
    timed = df.assign(step=1)
    for r in range(4):
        pd.concat([warm, timed])[lambda d: d["rank"] == r].to_csv(
            tmp_path / f"timeline_rank{r}.csv", index=False)
    case = SimpleNamespace(pipeline=SimpleNamespace(schedule="zb-h1", stages=4, microbatches=8,
                                                    chunks=1))
    bubble, simulated, _, ranks = _timed_bubble(tmp_path, case, first_timed=1)
    assert bubble == pytest.approx(sim.bubble, abs=1e-12)
    assert simulated == pytest.approx(sim.bubble, abs=1e-12)
    assert sorted(ranks) == [0, 1, 2, 3]
    for r, (measured, simulated_r) in ranks.items():
        assert measured == pytest.approx(1.0 - sim.busy[r] / sim.makespan, abs=1e-12)
        assert simulated_r == pytest.approx(measured, abs=1e-12)
