"""Tests of `tandem simulate` (harness.simulate, harness.netmodel, harness.simulate_cli) and its
report section. Every validation point of suites/simulate/validation.toml is one test that fails
when the model drifts past the point's bound; bad inputs must fail with messages naming the key.
Pure Python over the stored results; no engine, no timing gates."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from harness import netmodel as nm
from harness import schedule as sched
from harness import simulate as sm
from harness import simulate_cli as cli
from harness.cli import main
from harness.errors import ConfigError, DataError

POINTS = cli.load_points()


@pytest.mark.parametrize("point", POINTS, ids=[p.name for p in POINTS])
def test_validation_point_within_bound(point):
    c = cli.check_point(point)
    assert c.ok, (f"{point.name} ({point.role}): simulated {c.predicted:.4g} vs "
                  f"{c.reference:.4g} {c.metric}, error {c.error:+.1%} beyond ±{point.bound:.0%}; "
                  f"{c.detail}")


def test_points_cover_every_source_and_keep_predicted_ones():
    names = {p.name for p in POINTS}
    for need in ("llama3-405b-8k", "llama3-405b-16k", "megatron-462b", "megascale-175b"):
        assert need in names
    kinds = {p.kind for p in POINTS}
    assert kinds == {"measured", "replay", "published"}
    published = [p for p in POINTS if p.kind == "published"]
    assert sum(p.role == "predicted" for p in published) >= 3
    for p in POINTS:
        assert (p.role == "fitted") == bool(p.fitted), p.name


def test_validate_cli_exits_0_when_all_points_hold(capsys):
    assert main(["simulate", "--validate"]) == 0
    out = capsys.readouterr().out
    assert f"{len(POINTS)}/{len(POINTS)} points within their bounds" in out


def test_validate_exits_1_when_a_point_drifts(tmp_path, monkeypatch, capsys):
    text = cli.VALIDATION_FILE.read_text().replace("published_mfu = 0.43", "published_mfu = 0.6")
    bad = tmp_path / "validation.toml"
    bad.write_text(text)
    monkeypatch.setattr(cli, "VALIDATION_FILE", bad)
    assert main(["simulate", "--validate"]) == 1
    assert "outside: llama3-405b-8k" in capsys.readouterr().out


# ---- the step model ---------------------------------------------------------------------------


def _job(**kw):
    base = dict(tp=8, pp=16, dp=128, chunks=8, schedule="interleaved", microbatches=16,
                microbatch_size=1, seq_len=8192, order="tp,pp,dp")
    base.update(kw)
    return sm.Job(sm.load_model("llama3-405b"), nm.load_cluster("h100-sxm"), **base)


def test_breakdown_sums_to_the_step_and_mfu_matches_tokens():
    r = sm.simulate_step(_job())
    assert math.isclose(sum(r.breakdown.values()), r.step_s, rel_tol=1e-9)
    fpt = r.job.model.flops_per_token(8192)
    assert math.isclose(r.mfu, fpt * r.tokens_per_s / (r.job.gpus * 989e12), rel_tol=1e-12)
    assert r.job.tokens == 128 * 16 * 8192


def test_gpt2_flops_match_harness_flops():
    from harness.flops import flops_per_token

    m = sm.load_model("gpt2-350m")
    assert m.flops_per_token(1024) == flops_per_token(24, 1024, 50257, 1024, 1024)
    assert m.params() == 24 * (12 * 1024**2 + 13 * 1024) + 50257 * 1024 + 2 * 1024


def test_llama_405b_parameter_count():
    assert 400e9 < sm.load_model("llama3-405b").params() < 410e9


def test_more_microbatches_shrink_the_bubble_and_dp_overlap_helps():
    few, many = sm.simulate_step(_job(microbatches=16)), sm.simulate_step(_job(microbatches=32))
    assert many.bubble < few.bubble
    on = sm.simulate_step(_job(schedule="1f1b", chunks=1))
    off = sm.simulate_step(_job(schedule="1f1b", chunks=1, dp_overlap=False))
    assert off.breakdown["dp_comm_exposed"] > on.breakdown["dp_comm_exposed"]
    assert off.step_s > on.step_s


def test_tp_overlap_hides_tensor_parallel_communication():
    none, most = sm.simulate_step(_job()), sm.simulate_step(_job(tp_overlap=0.9))
    assert most.breakdown["tp_comm_exposed"] < 0.2 * none.breakdown["tp_comm_exposed"]


def test_stage_layers_leave_first_and_last_stage_empty_at_l_plus_2():
    j = sm.check_job(_job())
    layers = sm.stage_layers(j)
    assert len(layers) == 128 and sum(layers) == 126 and layers[0] == layers[-1] == 0


def test_shared_device_step_is_at_least_the_work_over_its_efficiency():
    c = nm.load_cluster("h100-1gpu-shared")
    j = sm.Job(sm.load_model("gpt2-350m"), c, pp=4, schedule="zb-h1", microbatches=16,
               microbatch_size=2, seq_len=1024)
    r = sm.simulate_step(j)
    assert r.step_s >= sum(r.sim.busy) / c.shared_device_eff
    one = sm.simulate_step(replace(j, pp=1, schedule="1f1b"))  # one rank: no sharing
    assert one.breakdown["shared_device_wait"] == pytest.approx(0.0, abs=1e-12)


def test_schedule_simulate_per_stage_durations():
    s = sched.generate("1f1b", 2, 1)
    sim = sched.simulate(s, f=[1.0, 2.0], b=[3.0, 4.0], w=0.0, comm=0.5)
    # F0 1, comm, F1 2, B1 4, comm, B0 3
    assert sim.makespan == pytest.approx(1 + 0.5 + 2 + 4 + 0.5 + 3)
    with pytest.raises(sched.ScheduleError, match="f has 3 per-stage durations"):
        sched.simulate(s, f=[1.0, 1.0, 1.0])


def test_one_k_gpu_layout_is_one_pipeline():
    # 1,024 GPUs: the simulator runs one pipeline of pp ranks, whatever dp is
    r = sm.simulate_step(_job(dp=8))
    assert len(r.sim.intervals) == 16 and r.job.gpus == 1024


# ---- network ------------------------------------------------------------------------------------


def test_collective_formulas():
    assert nm.ring_allreduce_s(1, 1e9, 1e9, 1e-6) == 0
    assert nm.ring_allreduce_s(4, 4e9, 1e9, 0.0) == pytest.approx(2 * 3 / 4 * 4)
    assert nm.tree_allreduce_s(1024, 0.0, 1e9, 1e-6) == pytest.approx(20e-6)
    net = nm.load_cluster("h100-sxm").net
    t_ring = nm.dp_allreduce_s(replace(net, algorithm="ring"), 4096, 1, 1e6)[0]
    t_tree = nm.dp_allreduce_s(replace(net, algorithm="tree"), 4096, 1, 1e6)[0]
    assert t_tree < t_ring  # small message, many ranks: latency dominates
    assert nm.dp_allreduce_s(net, 4096, 1, 1e6)[1] == "tree"


def test_oversubscription_only_slows_groups_that_exceed_pod_uplinks():
    net = nm.load_cluster("h100-sxm").net
    full = net.nic_bytes_per_s * net.nic_busbw_eff
    assert nm.nic_bw(net, 100, 128) == full  # inside a pod
    assert nm.nic_bw(net, 2000, 128) == full  # 128 groups x 7 < 3,072 GPUs of uplink
    assert nm.nic_bw(net, 2000, 3072) == pytest.approx(full / 7)


# ---- bad input ----------------------------------------------------------------------------------


def _cluster_text():
    return (nm.SUITES / "clusters" / "h100-sxm.toml").read_text()


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("[network]", "[network]\nnic_gbps = 400"),
     r"network\.nic_gbps: unknown key"),
    (lambda t: t.replace("domain_size = 8\n", ""), r"network\.domain_size: missing"),
    (lambda t: t.replace("hbm_eff = 0.9 ", 'hbm_eff = "fast" '),
     r"gpu\.hbm_eff = 'fast': expected float"),
    (lambda t: t.replace("hbm_eff = 0.9 ", "hbm_eff = 1.5 "), r"gpu\.hbm_eff = 1\.5: must be in"),
    (lambda t: t.replace('algorithm = "auto"', 'algorithm = "ring-tree"'),
     r"network\.algorithm = 'ring-tree': unknown value"),
    (lambda t: t.replace("[[gpu.attention]]", "[[gpu.attention]]\nwidth = 1", 1),
     r"gpu\.attention\[0\]\.width: unknown key"),
])
def test_bad_cluster_files_name_the_key(tmp_path, edit, match):
    p = tmp_path / "c.toml"
    p.write_text(edit(_cluster_text()))
    with pytest.raises(ConfigError, match=match):
        nm.load_cluster(str(p))


def test_bad_model_files_and_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'gpt5'.*built-in: .*gpt2-124m"):
        sm.load_model("gpt5")
    p = tmp_path / "m.toml"
    p.write_text((nm.SUITES / "models" / "gpt2-124m.toml").read_text()
                 .replace('arch = "gpt2"', 'arch = "moe"'))
    with pytest.raises(ConfigError, match=r"model\.arch = 'moe': unknown value"):
        sm.load_model(str(p))
    p.write_text((nm.SUITES / "models" / "gpt2-124m.toml").read_text()
                 .replace("n_head = 12", "n_head = 7"))
    with pytest.raises(ConfigError, match=r"n_head = 7: must divide n_embd = 768"):
        sm.load_model(str(p))


@pytest.mark.parametrize("layout, match", [
    ("tp=8,pp=16,xp=2", r"'xp=2' is not tp=N"),
    ("tp=eight", r"tp = 'eight' is not an integer"),
    ("pp=0", r"pp must be >= 1"),
])
def test_bad_layout_strings(layout, match):
    with pytest.raises(ConfigError, match=match):
        sm.parse_layout(layout)


def test_bad_jobs():
    with pytest.raises(ConfigError, match=r"tp = 16 exceeds the NVLink domain of 8 GPUs"):
        sm.simulate_step(_job(tp=16))
    with pytest.raises(ConfigError, match=r"pp x chunks = 256 virtual stages for 126 layers"):
        sm.simulate_step(_job(chunks=16))
    with pytest.raises(ConfigError, match=r"chunks = 2 needs schedule 'interleaved'"):
        sm.simulate_step(_job(schedule="1f1b", chunks=2))


def test_bad_validation_points(tmp_path):
    p = tmp_path / "v.toml"
    p.write_text('[[point]]\nname = "x"\nkind = "guessed"\nrole = "predicted"\nsource = "s"\n'
                 'bound = 0.1\n')
    with pytest.raises(ConfigError, match=r"point\[0\]\.kind = 'guessed': unknown value"):
        cli.load_points(p)
    p.write_text('[[point]]\nname = "x"\nkind = "published"\nrole = "predicted"\n'
                 'source = "s"\nbound = 0.1\nmodel = "gpt2-124m"\ncluster = "h100-sxm"\n')
    with pytest.raises(ConfigError, match=r"point\[0\]\.published_mfu: required"):
        cli.load_points(p)


def test_cli_bad_input_exits_2(capsys):
    assert main(["simulate", "--model", "gpt2-124m"]) == 2
    assert "--model needs --cluster" in capsys.readouterr().err
    assert main(["simulate"]) == 2
    assert main(["simulate", "--model", "gpt2-124m", "--cluster", "h100-sxm",
                 "--layout", "tp=16"]) == 2
    assert "exceeds the NVLink domain" in capsys.readouterr().err


def test_calibration_from_bench_records():
    scale, why = cli.calibration_scale("results/gpu-pipeline/h100-2026-12-06-m16/records.parquet",
                                       "350m-1stage-m16")
    assert scale == pytest.approx(1.0, abs=0.01)  # that run is one the model was fitted on
    assert "h100-sxm" in why and "221.1 ms" in why
    with pytest.raises(ConfigError, match=r"a 4-stage case; calibrate on a one-stage case"):
        cli.calibration_scale("results/gpu-pipeline/h100-2026-12-06-m16/records.parquet",
                              "350m/schedule=zb-h1,stages=4,microbatches=16")
    with pytest.raises(DataError, match=r"no engine step_ms rows for case 'nope'"):
        cli.calibration_scale("results/gpu/bench-h200/records.parquet", "nope")


def test_calibrated_job_scales_compute(capsys):
    args = ["simulate", "--model", "gpt2-1.5b", "--cluster", "h100-sxm", "--layout",
            "pp=4,dp=2", "--schedule", "zb-h1", "--microbatches", "8", "--json"]
    import json

    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--calibrate", "results/gpu/bench-1.5b-r5-h200/records.parquet",
                        "gpt2-1.5b"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal["compute_scale"] > 1 and cal["step_s"] > plain["step_s"]


# ---- Amdahl, CLI output, report -----------------------------------------------------------------


def test_amdahl():
    assert sm.amdahl(10.0, 1.0) == pytest.approx(10.0)
    assert sm.amdahl(1e12, 0.9) == pytest.approx(10.0)
    assert sm.amdahl_needed(10.0, 0.95) == pytest.approx(0.95 / (0.1 - 0.05))
    assert math.isinf(sm.amdahl_needed(10.0, 0.9))
    assert sm.amdahl(sm.amdahl_needed(5.0, 0.9), 0.9) == pytest.approx(5.0)


def test_single_job_json(capsys):
    import json

    assert main(["simulate", "--model", "gpt2-350m", "--cluster", "h100-sxm", "--layout",
                 "tp=1,pp=4,dp=2", "--schedule", "zb-h1", "--microbatches", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] == 8 and d["schedule"] == "zb-h1" and 0 < d["mfu"] < 1


def test_scaling_out_renders_in_report(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--scaling", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Amdahl: a claimed 10x step speedup" in text and "219904" in text
    for f in ("simulate.json", "simulate.parquet"):
        assert (out / f).is_file(), f
    from reports.build import build_report

    index = build_report([out], tmp_path / "report")
    md = Path(index).with_name("report.md").read_text()
    assert "Simulated scale (tandem simulate)" in md and "Projection: llama3-405b" in md
    for f in ("simulate_breakdown.png", "simulate_scaling.png"):
        assert (tmp_path / "report" / "figures" / f).is_file(), f
        assert f"figures/{f}" in md


def test_measured_data_found_from_an_installed_package(tmp_path, monkeypatch):
    """Installed from a wheel, the harness sits in site-packages with no results/ beside it: the
    validation data is found from the working directory (a checkout), and where it is nowhere the
    error names the places looked in."""
    repo = Path(__file__).resolve().parents[2]  # the checkout these tests run from
    monkeypatch.setattr(cli, "ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(repo)
    rel = "results/gpu/bench-h200/records.parquet"
    assert cli.data_path(rel) == repo / rel
    assert cli.measured_step_s(rel, "gpt2-124m") > 0
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"bench-h200/records.parquet: not found \(looked in .*"
                                        r"site-packages.*\); measured validation data lives"):
        cli.measured_step_s(rel, "gpt2-124m")
    assert cli.data_path(str(repo / rel)) == repo / rel
