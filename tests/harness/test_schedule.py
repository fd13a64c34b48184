"""Tests of harness.schedule (generators, validator, simulator, dump/load, chart) and of the
`tandem schedule` command. Pure Python, no engine; the whole file runs in about a second."""

from __future__ import annotations

import json

import pytest

from harness import schedule as sc
from harness.cli import main
from harness.errors import DataError
from harness.schedule import Action, Schedule, ScheduleError

A = Action
PS = (1, 2, 3, 4)
MS = (1, 2, 4, 8)


def cases():
    """(name, P, M, V) for every generator × P × M where the combination is allowed."""
    out = [(n, P, M, 1) for n in ("gpipe", "1f1b", "zb-h1") for P in PS for M in MS]
    out += [("interleaved", P, M, V) for P in PS for M in MS + (3, 6, 12) for V in (1, 2, 3)
            if M % P == 0]
    return out


def ids(case):
    return "{}-P{}-M{}-V{}".format(*case)


def replace(s: Schedule, rank: int, acts) -> Schedule:
    lists = list(s.actions)
    lists[rank] = tuple(acts)
    return Schedule(s.name, s.ranks, s.microbatches, s.chunks, s.stage_to_rank, tuple(lists))


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("case", cases(), ids=ids)
def test_every_generator_validates(case):
    name, P, M, V = case
    s = sc.generate(name, P, M, V)
    assert (s.ranks, s.microbatches, s.chunks, s.stages) == (P, M, V, P * V)
    assert len(s.actions) == P
    sc.validate(s)
    per_rank = 2 * M * V if name != "zb-h1" else 3 * M
    assert all(len(acts) == per_rank for acts in s.actions)


@pytest.mark.parametrize("case", cases(), ids=ids)
def test_simulated_bubble_equals_theory(case):
    name, P, M, V = case
    sim = sc.simulate(sc.generate(name, P, M, V), f=1.0, b=1.0, w=1.0)
    theory = sc.theoretical_bubble(name, P, M, V)
    if name == "zb-h1" and M < P:
        # the paper's formula assumes M >= P; with fewer it must still beat 1F1B
        assert theory.of_step <= sim.bubble <= sc.theoretical_bubble("1f1b", P, M).of_step + 1e-12
        return
    assert sim.bubble == pytest.approx(theory.of_step, abs=1e-12)
    assert sim.bubble_of_compute == pytest.approx(theory.of_compute, abs=1e-12)


def test_theory_conventions_by_hand():
    t = sc.theoretical_bubble("1f1b", 4, 8)
    assert (t.of_compute, t.of_step) == pytest.approx((3 / 8, 3 / 11))
    assert sc.theoretical_bubble("gpipe", 4, 8).of_step == pytest.approx(3 / 11)
    t = sc.theoretical_bubble("interleaved", 4, 8, 2)
    assert (t.of_compute, t.of_step) == pytest.approx((3 / 16, 3 / 19))
    t = sc.theoretical_bubble("zb-h1", 4, 8)  # (P-1)/(3M) with F = B = W
    assert (t.of_compute, t.of_step) == pytest.approx((3 / 24, 3 / 27))
    assert sc.theoretical_bubble("zb-h1", 4, 8, f=2, b=2, w=1).of_compute == pytest.approx(
        3 * 3 / (8 * 5))


@pytest.mark.parametrize("fbw", [(1, 2, 1), (2, 2, 1), (1, 1, 0.5), (2, 3, 2)])
@pytest.mark.parametrize("P,M", [(2, 4), (3, 6), (4, 8), (4, 4)])
def test_zb_h1_bubble_with_unequal_passes(fbw, P, M):
    """(P−1)(F+B−W) idle per rank, as the paper, whenever W <= F."""
    f, b, w = fbw
    sim = sc.simulate(sc.zb_h1(P, M), f, b, w)
    theory = sc.theoretical_bubble("zb-h1", P, M, f=f, b=b, w=w)
    assert sim.bubble == pytest.approx(theory.of_step, abs=1e-12)
    # and 1F1B with the same passes sits at (P-1)/M of compute whatever f, b, w are
    sim = sc.simulate(sc.one_f_one_b(P, M), f, b, w)
    assert sim.bubble_of_compute == pytest.approx((P - 1) / M, abs=1e-12)


@pytest.mark.parametrize("P", PS)
@pytest.mark.parametrize("M", MS)
def test_peak_in_flight_matches_facts(P, M):
    assert sc.simulate(sc.gpipe(P, M)).peak_in_flight == (M,) * P
    assert sc.peak_in_flight(sc.one_f_one_b(P, M)) == tuple(min(P - r, M) for r in range(P))
    zb = sc.peak_in_flight(sc.zb_h1(P, M))
    assert all(p <= P for p in zb)
    assert zb == (min(P, M),) * P  # "p on every rank" once M >= P


@pytest.mark.parametrize("P,M,V", [(2, 4, 2), (4, 8, 2), (4, 16, 3), (3, 6, 2), (4, 4, 2)])
def test_interleaved_peak_in_flight_rank0(P, M, V):
    """Rank 0 holds 2(P−1) + (V−1)P + 1 chunk activation sets = P + (P−1)/V micro-batches."""
    peak = sc.peak_in_flight(sc.interleaved(P, M, V))
    assert peak[0] == min(M * V, V * P + P - 1)
    if M * V >= V * P + P - 1:
        assert peak[0] / V == pytest.approx(P + (P - 1) / V)


def test_orders_by_hand():
    s = sc.one_f_one_b(3, 4)
    assert [f"{a.kind}{a.microbatch}" for a in s.actions[0]] == \
        ["F0", "F1", "F2", "BW0", "F3", "BW1", "BW2", "BW3"]
    assert [f"{a.kind}{a.microbatch}" for a in s.actions[2]] == \
        ["F0", "BW0", "F1", "BW1", "F2", "BW2", "F3", "BW3"]
    z = sc.zb_h1(2, 3)
    assert [f"{a.kind}{a.microbatch}" for a in z.actions[1]] == \
        ["F0", "B0", "F1", "B1", "W0", "F2", "B2", "W1", "W2"]
    i = sc.interleaved(2, 2, 2)  # rank 0 holds stages 0 and 2
    assert [str(a) for a in i.actions[0][:4]] == [
        "F(stage=0, mb=0)", "F(stage=0, mb=1)", "F(stage=2, mb=0)", "F(stage=2, mb=1)"]
    assert i.stage_to_rank == (0, 1, 0, 1)


def test_p1_is_trivial():
    for name in ("gpipe", "1f1b", "zb-h1"):
        s = sc.generate(name, 1, 3)
        sc.validate(s)
        sim = sc.simulate(s)
        assert sim.bubble == 0.0 and sim.makespan == 9.0


def test_generate_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown schedule 'zbv'; allowed: gpipe, 1f1b, "
                                         "interleaved, zb-h1"):
        sc.generate("zbv", 2, 2)
    with pytest.raises(ScheduleError, match=r"M=6 must be a multiple of ranks P=4"):
        sc.generate("interleaved", 4, 6, 2)
    with pytest.raises(ScheduleError, match="only meaningful for 'interleaved'"):
        sc.generate("1f1b", 2, 2, 2)
    with pytest.raises(ScheduleError, match="ranks P must be an integer >= 1, got 0"):
        sc.gpipe(0, 2)


# ----------------------------------------------------------------------------- validation


def test_missing_backward_is_rejected():
    s = sc.one_f_one_b(2, 4)
    acts = [a for a in s.actions[1] if a != A("BW", 1, 3)]
    with pytest.raises(ScheduleError, match=r"missing BW or B/W for stage 1 mb 3"):
        sc.validate(replace(s, 1, acts))


def test_missing_w_is_rejected():
    s = sc.zb_h1(2, 2)
    acts = [a for a in s.actions[0] if a != A("W", 0, 1)]
    with pytest.raises(ScheduleError, match=r"missing W for stage 0 mb 1"):
        sc.validate(replace(s, 0, acts))


def test_b_before_its_f_is_rejected():
    s = sc.zb_h1(2, 4)
    acts = list(s.actions[1])
    i, j = acts.index(A("F", 1, 2)), acts.index(A("B", 1, 2))
    acts[i], acts[j] = acts[j], acts[i]
    with pytest.raises(ScheduleError, match=rf"rank 1 action {i} B\(stage=1, mb=2\): its "
                                            rf"F\(stage=1, mb=2\) has not run on rank 1"):
        sc.validate(replace(s, 1, acts))


def test_w_without_earlier_b_is_rejected():
    s = sc.zb_h1(2, 2)
    acts = list(s.actions[1])  # F0 B0 F1 B1 W0 W1
    acts = acts[:1] + [A("W", 1, 0)] + [a for a in acts[1:] if a != A("W", 1, 0)]
    with pytest.raises(ScheduleError, match=r"rank 1 action 1 W\(stage=1, mb=0\): no earlier "
                                            r"B\(stage=1, mb=0\) on rank 1"):
        sc.validate(replace(s, 1, acts))


def test_wrong_rank_is_rejected():
    s = sc.one_f_one_b(2, 2)
    acts = list(s.actions[0]) + [A("F", 1, 0)]
    with pytest.raises(ScheduleError, match=r"rank 0 action 4 F\(stage=1, mb=0\): stage 1 "
                                            r"belongs to rank 1, not rank 0 \(wrong rank\)"):
        sc.validate(replace(s, 0, acts))


def test_duplicate_and_mixed_backward_are_rejected():
    s = sc.gpipe(2, 2)
    with pytest.raises(ScheduleError, match=r"rank 0 action 4 F\(stage=0, mb=1\): duplicate "
                                            r"of action 1 on rank 0"):
        sc.validate(replace(s, 0, list(s.actions[0]) + [A("F", 0, 1)]))
    with pytest.raises(ScheduleError, match=r"rank 0 action 4 B\(stage=0, mb=0\): stage 0 mb 0 "
                                            r"already has a BW"):
        sc.validate(replace(s, 0, list(s.actions[0]) + [A("B", 0, 0)]))


def test_out_of_range_is_rejected():
    s = sc.gpipe(2, 2)
    with pytest.raises(ScheduleError, match=r"rank 1 action 4 F\(stage=1, mb=2\): micro-batch "
                                            r"outside \[0, 2\)"):
        sc.validate(replace(s, 1, list(s.actions[1]) + [A("F", 1, 2)]))
    with pytest.raises(ScheduleError, match=r"unknown kind 'X'"):
        sc.validate(replace(s, 1, list(s.actions[1]) + [A("X", 1, 0)]))


def test_deadlock_names_each_stuck_rank_and_what_it_waits_for():
    # rank 0 runs BW0 before F1; rank 1 wants F1 before BW0: a cycle through both ranks
    s = Schedule("bad", 2, 2, 1, (0, 1), (
        (A("F", 0, 0), A("BW", 0, 0), A("F", 0, 1), A("BW", 0, 1)),
        (A("F", 1, 0), A("F", 1, 1), A("BW", 1, 0), A("BW", 1, 1)),
    ))
    with pytest.raises(ScheduleError) as info:
        sc.validate(s)
    msg = str(info.value)
    assert msg.startswith("deadlock: ")
    assert ("rank 0 action 1 BW(stage=0, mb=0) waits for the input-gradient from "
            "BW(stage=1, mb=0) (action 2 on rank 1)") in msg
    assert ("rank 1 action 1 F(stage=1, mb=1) waits for the activation from "
            "F(stage=0, mb=1) (action 2 on rank 0)") in msg
    with pytest.raises(ScheduleError, match="deadlock"):
        sc.simulate(s)


def test_self_deadlock_on_one_rank_with_two_chunks():
    s = Schedule("bad", 1, 1, 2, (0, 0), (
        (A("F", 1, 0), A("F", 0, 0), A("BW", 1, 0), A("BW", 0, 0)),))
    with pytest.raises(ScheduleError, match=r"rank 0 action 0 F\(stage=1, mb=0\) waits for the "
                                            r"activation from F\(stage=0, mb=0\) \(its own "
                                            r"action 1, later in its list\)"):
        sc.validate(s)


def test_unmatched_receive_is_named_by_the_flow_simulation():
    # simulate() does not run the static checks, so the flow itself must name a message no rank
    # ever sends
    s = Schedule("bad", 2, 1, 1, (0, 1), ((A("F", 0, 0), A("BW", 0, 0)), (A("F", 1, 0),)))
    with pytest.raises(ScheduleError, match=r"rank 0 action 1 BW\(stage=0, mb=0\) waits for the "
                                            r"input-gradient .* which no rank ever runs "
                                            r"\(unmatched receive\)"):
        sc.simulate(s)


# ----------------------------------------------------------------------------- simulation


def test_simulation_intervals_and_comm():
    s = sc.one_f_one_b(2, 2)
    sim = sc.simulate(s, f=1, b=2, w=1)
    assert sim.intervals[1][0] == ("F", 1, 0, 1.0, 2.0)
    assert sim.intervals[1][1] == ("BW", 1, 0, 2.0, 5.0)  # BW costs b + w
    assert sim.busy == (8.0, 8.0)
    assert sim.makespan == 12.0  # (M + P − 1)(f + b + w)
    slow = sc.simulate(s, f=1, b=2, w=1, comm=0.5)
    assert slow.intervals[1][0].start == 1.5  # the activation crosses ranks: +comm
    assert slow.intervals[1][1].start == 2.5  # its own F: same rank, no comm
    assert slow.intervals[0][2].start == 5.5 + 0.5  # the gradient crosses back: +comm
    assert slow.makespan > sim.makespan


# ----------------------------------------------------------------------------- dump / load


@pytest.mark.parametrize("case", [("1f1b", 3, 4, 1), ("interleaved", 2, 4, 2), ("zb-h1", 4, 8, 1)],
                         ids=ids)
def test_csv_round_trip(tmp_path, case):
    name, P, M, V = case
    s = sc.generate(name, P, M, V)
    path = tmp_path / "schedule.csv"
    sc.to_csv(s, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "rank,index,kind,stage,microbatch"  # header first, no comment line
    assert len(lines) == 1 + sum(len(a) for a in s.actions)
    assert lines[1] == "0,0,F,0,0"
    ranks = [int(line.split(",")[0]) for line in lines[1:]]
    assert ranks == sorted(ranks)
    back = sc.from_csv(path, P, M, V, name=name)
    assert back == s
    sc.validate(back)
    rows = sc.to_rows(s)
    assert rows[0] == {"rank": 0, "index": 0, "kind": "F", "stage": 0, "microbatch": 0}


def test_from_csv_rejects_bad_files(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("# comment\nrank,index,kind,stage,microbatch\n")
    with pytest.raises(DataError, match="first line must be the header"):
        sc.from_csv(path, 1, 1)
    path.write_text("rank,index,kind,stage,microbatch\n0,1,F,0,0\n")
    with pytest.raises(DataError, match=r"bad.csv:2: rank 0 index 1, expected 0"):
        sc.from_csv(path, 1, 1)


def test_json_round_trip():
    s = sc.interleaved(2, 4, 2)
    text = sc.to_json(s)
    assert json.loads(text)["stage_to_rank"] == [0, 1, 0, 1]
    assert sc.from_json(text) == s
    assert sc.from_json(json.loads(text)) == s


# ----------------------------------------------------------------------------- chart


def test_chart_order_and_time_aligned():
    s = sc.one_f_one_b(2, 2)
    plain = sc.chart(s).splitlines()
    assert "b3 fused backward" in plain[0] and "idle" in plain[0]
    assert plain[1].split("|")[1].split() == ["F0", "F1", "b0", "b1"]
    timed = sc.chart(s, sc.simulate(s)).splitlines()
    # one column per time unit (f = b = w = 1, BW spans 2), idle units as dots, both lines span
    # the makespan of 9 units
    assert timed[1:] == [
        "rank 0 | F0 F1 .. .. b0--- .. b1---",
        "rank 1 | .. F0 b0--- F1 b1--- .. ..",
    ]
    inter = sc.chart(sc.interleaved(2, 2, 2))
    assert "F0.1" in inter and "local chunk" in inter


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_chart_and_numbers(capsys):
    rc = main(["schedule", "--schedule", "1f1b", "--stages", "4", "--microbatches", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rank 3 |" in out
    assert "0.3750 of ideal compute" in out and "0.2727 of the step" in out
    assert "simulated bubble" in out
    assert "peak in-flight micro-batches per rank: r0 4, r1 3, r2 2, r3 1" in out


def test_cli_json_parses(capsys, tmp_path):
    csv_path = tmp_path / "s.csv"
    rc = main(["schedule", "--schedule", "zb-h1", "--stages", "4", "--microbatches", "8",
               "--json", "--csv", str(csv_path), "--f", "1", "--b", "1", "--w", "1"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schedule"] == "zb-h1" and d["ranks"] == 4
    assert d["theoretical_bubble"]["of_compute"] == pytest.approx(3 / 24)
    assert d["simulated"]["bubble_of_step"] == pytest.approx(d["theoretical_bubble"]["of_step"])
    assert d["peak_in_flight_microbatches"] == [4, 4, 4, 4]
    assert sc.from_csv(csv_path, 4, 8).actions == sc.zb_h1(4, 8).actions


def test_cli_interleaved_reports_activation_sets(capsys):
    assert main(["schedule", "--schedule", "interleaved", "-P", "2", "-M", "4", "-V", "2"]) == 0
    out = capsys.readouterr().out
    assert "(P-1)/(V*M)" in out and "r0 5 (2.5)" in out


@pytest.mark.parametrize("argv,message", [
    (["--schedule", "interleaved", "--stages", "3", "--microbatches", "4", "--chunks", "2"],
     "needs --microbatches to be a multiple of --stages: M=4 % P=3 = 1"),
    (["--schedule", "1f1b", "--stages", "0", "--microbatches", "4"], "--stages must be >= 1"),
    (["--schedule", "gpipe", "--stages", "2", "--microbatches", "4", "--chunks", "2"],
     "--chunks 2 only applies to --schedule interleaved"),
    (["--schedule", "gpipe", "--stages", "2", "--microbatches", "4", "--f", "-1"],
     "--f must be finite and >= 0"),
])
def test_cli_bad_combination_exits_2(capsys, argv, message):
    rc = main(["schedule"] + argv)
    captured = capsys.readouterr()
    assert rc == 2
    assert message in captured.err
    assert captured.err.startswith("tandem schedule: error: ")
    assert captured.out == ""
