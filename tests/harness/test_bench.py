"""`tandem bench` end to end on a tiny inline suite (a one-stage case and a 2-stage 1F1B case):
rows per side and metric, summaries with spread, MFU arithmetic, run.json, resume, bad input,
and a failing rank. Times nothing itself: timings are what the command records, never asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from harness import bench
from harness.cli import main
from harness.config import load_suite
from harness.errors import ConfigError
from harness.flops import flops_for_case

pipeline = pytest.importorskip("harness.pipeline")
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(pipeline.unavailable() is not None,
                                                  reason=str(pipeline.unavailable()))]

SUITE = """
[suite]
name = "bench-test"
description = "tiny bench for the tests"

[bench]
repeats = 2
warmup = 1

[defaults]
seed = 3
model = { n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 64, n_positions = 16 }
seq_len = 8
batch_size = 4
steps = 2
tiers = ["model"]

[[case]]
name = "one"

[[case]]
name = "p2"
pipeline = { stages = 2, microbatches = 2, schedule = "1f1b" }
"""

THROUGHPUT = ("step_ms", "tokens_per_s", "flops_per_s", "mfu", "mfu_palm", "peak_mem_bytes")
FAST = ["--min-time", "0.02", "--threads", "1"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One bench run shared by the tests below: (suite file, out dir, exit code, stdout)."""
    d = tmp_path_factory.mktemp("bench")
    suite = d / "suite.toml"
    suite.write_text(SUITE)
    out = d / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "--suite", str(suite), "--out", str(out), *FAST])
    return suite, out, rc, buf.getvalue()


def test_rows_for_every_side_metric_and_case(first_run):
    _, out, rc, stdout = first_run
    assert rc == 0, stdout
    df = pd.read_parquet(out / "records.parquet")
    for case in ("one", "p2"):
        c = df[df["case"] == case]
        for side in ("engine", "jax"):
            for metric in THROUGHPUT:
                rows = c[(c["side"] == side) & (c["metric"] == metric)]
                assert set(rows["repeat"]) == {-1, 0, 1}, (case, side, metric)
        assert set(c[(c["side"] == "jax") & (c["metric"] == "compile_s")]["repeat"]) == {-1, 0}
        ratio = c[(c["side"] == "ratio") & (c["metric"] == "speedup")]
        assert set(ratio["repeat"]) == {-1, 0, 1}
        # every row carries the case axes and the machine
        assert (c["n_layer"] == 2).all() and (c["seq_len"] == 8).all()
        assert (c["backend"] == "cpu").all() and (c["dtype"] == "fp32").all()
        assert c["device"].str.len().gt(0).all() and c["commit"].str.len().gt(0).all()
    p2 = df[df["case"] == "p2"]
    assert (p2["stages"] == 2).all() and (p2["schedule"] == "1f1b").all()
    assert set(df[df["case"] == "one"]["schedule"]) == {"none"}
    bubble = p2[p2["metric"] == "bubble"]
    assert set(bubble[bubble["side"] == "engine"]["repeat"]) == {-1, 0, 1}
    theory = bubble[(bubble["side"] == "theory") & (bubble["repeat"] == -1)]
    assert theory["value"].iloc[0] == pytest.approx(1 / 3)  # (P-1)/(M+P-1), P = M = 2
    assert (bubble["value"].between(0, 1)).all()
    # the simulated bubble (the schedule replayed with the job's own stage durations) per repeat
    sim = p2[(p2["metric"] == "bubble_sim") & (p2["side"] == "theory")]
    assert set(sim["repeat"]) == {-1, 0, 1} and sim["value"].between(0, 1).all()
    # the final table names both cases and the CPU-pipeline caveat, and gives the p2 case's
    # bubble as measured / simulated / theory
    assert "one" in stdout and "p2" in stdout and "measure the schedule" in stdout
    assert "bubble meas. / sim. / theory" in stdout
    p2_line = next(l for l in stdout.splitlines() if l.startswith("p2 "))
    assert re.search(r"\d+\.\d% / \d+\.\d% / 33\.3%$", p2_line), p2_line
    # and rank by rank (the last job), in the notes and in run.json
    assert re.search(r"p2: bubble per rank, measured / simulated \(last job\): "
                     r"r0 \d+\.\d% / \d+\.\d%, r1 \d+\.\d% / \d+\.\d%", stdout), stdout
    rb = json.loads((out / "run.json").read_text())["cases"]["p2"]["engine"]["rank_bubble"]
    assert sorted(rb) == ["0", "1"]
    assert all(0 <= v[k] < 1 for v in rb.values() for k in ("measured", "simulated"))


def test_summary_rows_carry_median_and_spread(first_run):
    _, out, _, _ = first_run
    df = pd.read_parquet(out / "records.parquet")
    summ = df[df["repeat"] == -1]
    assert summ["spread_lo"].notna().all() and summ["spread_hi"].notna().all()
    assert (summ["spread_lo"] <= summ["value"] + 1e-12).all()
    assert (summ["value"] <= summ["spread_hi"] + 1e-12).all()
    raw = df[df["repeat"] >= 0]
    assert raw["spread_lo"].isna().all()
    for (case, side, metric), g in raw.groupby(["case", "side", "metric"]):
        s = summ[(summ["case"] == case) & (summ["side"] == side) & (summ["metric"] == metric)]
        assert len(s) == 1
        med, lo, hi = np.median(g["value"]), np.percentile(g["value"], 25), \
            np.percentile(g["value"], 75)
        np.testing.assert_allclose(s[["value", "spread_lo", "spread_hi"]].iloc[0],
                                   [med, lo, hi], rtol=1e-12)


def test_mfu_rows_carry_the_peak_and_match_the_arithmetic(first_run):
    suite_path, out, _, _ = first_run
    df = pd.read_parquet(out / "records.parquet")
    run = json.loads((out / "run.json").read_text())
    peak = run["env"]["cpu_gemm_peak"]["flops_per_s"]
    suite = load_suite(suite_path)
    mfu = df[df["metric"].isin(["mfu", "mfu_palm"])]
    assert len(mfu) and (mfu["peak_flops"] == peak).all()
    assert (mfu["peak_source"] == run["env"]["cpu_gemm_peak"]["source"]).all()
    assert df[~df["metric"].isin(["mfu", "mfu_palm"])]["peak_flops"].isna().all()
    key = ["case", "side", "repeat"]
    tps = df[df["metric"] == "tokens_per_s"].set_index(key)["value"]
    for metric, conv in (("mfu", "tandem"), ("mfu_palm", "palm")):
        for (case, side, rep), row in mfu[mfu["metric"] == metric].set_index(key).iterrows():
            fpt = flops_for_case(suite.case(case), conv)
            assert row["value"] == tps[(case, side, rep)] * fpt / peak
    # tokens/s and step time describe the same steps: B*T tokens per step
    step = df[(df["metric"] == "step_ms") & (df["repeat"] >= 0)].set_index(key)["value"]
    np.testing.assert_allclose(tps.loc[step.index], 4 * 8 / (step / 1e3), rtol=1e-12)
    # speedup of each pair = engine tokens/s / JAX tokens/s
    sp = df[(df["metric"] == "speedup") & (df["repeat"] >= 0)]
    for row in sp.itertuples():
        want = tps[(row.case, "engine", row.repeat)] / tps[(row.case, "jax", row.repeat)]
        assert row.value == pytest.approx(want, rel=1e-12)


def test_run_json_has_env_peaks_notes_and_traces(first_run):
    _, out, _, _ = first_run
    run = json.loads((out / "run.json").read_text())
    assert run["env"]["cpu_model"] and run["env"]["commit"]
    assert run["peaks"]["cpu fp32"]["flops"] == run["env"]["cpu_gemm_peak"]["flops_per_s"]
    assert run["command"].startswith("tandem bench --suite")
    assert run["suite"]["name"] == "bench-test"
    assert run["bench"]["repeats"] == 2 and run["bench"]["warmup"] == 1
    one, p2 = run["cases"]["one"], run["cases"]["p2"]
    assert one["status"] == p2["status"] == "done"
    assert one["jax_baseline"] == "single-device"
    assert p2["jax_baseline"].startswith("gpipe")
    assert len(p2["jax"]["devices"]) == 2  # the worker saw 2 host devices
    trace = json.loads((out / "traces" / "p2.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])
    assert sorted(p.name for p in (out / "timelines" / "p2").iterdir()) == \
        ["timeline_rank0.csv", "timeline_rank1.csv"]
    assert not (out / "work" / "one").exists()  # scratch files of finished cases are removed


def test_resume_skips_finished_cases(first_run):
    suite, out, _, _ = first_run
    before = pd.read_parquet(out / "records.parquet")
    rc = main(["bench", "--suite", str(suite), "--out", str(out), *FAST])
    assert rc == 0
    after = pd.read_parquet(out / "records.parquet")
    assert len(after) == len(before)
    run = json.loads((out / "run.json").read_text())
    assert len(run["commands"]) == 2


def test_fallback_baseline_when_layers_do_not_split(tmp_path):
    """3 layers over 2 stages: no JAX GPipe; the worker falls back to the single-device step and
    says why (built in this process, not compiled: the choice is made before any call)."""
    import dataclasses

    from harness.bench_jax import _Side
    from harness.init import init_params, write_safetensors
    from reference.gpt2 import param_shapes

    case = load_suite(tmp_path_suite(tmp_path)).case("p2")
    case = dataclasses.replace(case, model=dataclasses.replace(case.model, n_layer=3))
    write_safetensors(tmp_path / "w.safetensors",
                      init_params(list(param_shapes(case.model).items()), 3, 0))
    x = np.zeros((1, 4, 8), np.int32)
    np.savez(tmp_path / "d.npz", inputs_SBT=x, targets_SBT=x, untimed_order=[0, 0],
             timed_order=[0])
    c = {"model": dataclasses.asdict(case.model), "optim": dataclasses.asdict(case.optim),
         "stages": 2, "microbatches": 2, "schedule": "1f1b", "dtype": "fp32", "backend": "cpu"}
    import jax

    precision = jax.config.jax_default_matmul_precision  # _Side sets it for fp32: put it back
    try:
        side = _Side({"case": c, "weights": str(tmp_path / "w.safetensors"),
                      "data": str(tmp_path / "d.npz")})
    finally:
        jax.config.update("jax_default_matmul_precision", precision)
    assert side.baseline == "single-device (fallback)"
    assert "n_layer = 3 is not divisible by stages = 2" in side.baseline_note


def tmp_path_suite(tmp_path):
    (tmp_path / "s.toml").write_text(SUITE)
    return tmp_path / "s.toml"


def test_failing_rank_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "s.toml").write_text(SUITE)
    monkeypatch.setenv("TANDEM_CRASH", "1:0")  # rank 1 exits at step 0 (runtime.c test hook)
    rc = main(["bench", "--suite", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"),
               "--no-jax", *FAST])
    assert rc == 3
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["cases"]["one"]["status"] == "done"
    assert run["cases"]["p2"]["status"] == "failed"
    assert "rank 1" in run["cases"]["p2"]["error"]
    df = pd.read_parquet(tmp_path / "out" / "records.parquet")
    assert set(df["case"]) == {"one"} and set(df["side"]) == {"engine"}
    assert "FAILED" in capsys.readouterr().out


def test_bad_suite_exits_2_naming_the_key(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text(SUITE.replace("steps = 2", "steps = 0"))
    assert main(["bench", "--suite", str(tmp_path / "bad.toml"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "defaults.steps = 0" in capsys.readouterr().err
    assert main(["bench", "--suite", "no-such-suite"]) == 2
    (tmp_path / "ok.toml").write_text(SUITE)
    assert main(["bench", "--suite", str(tmp_path / "ok.toml"), "--case", "nope"]) == 2
    assert "--case 'nope'" in capsys.readouterr().err
    assert main(["bench", "--suite", str(tmp_path / "ok.toml"), "--repeats", "0"]) == 2
    assert not (tmp_path / "out").exists()


def test_summarize_and_case_selection():
    assert bench.summarize([1.0, 2.0, 3.0, 10.0]) == (2.5, 1.75, 4.75)
    suite = load_suite("cpu-scaling")
    picked = bench.select_cases(suite, ["microbatches"])
    assert [c.name for c in picked] == [c.name for c in suite.cases
                                        if c.name.startswith("microbatches/")]
    with pytest.raises(ConfigError, match="no such case"):
        bench.select_cases(suite, ["nothing"])


def test_results_of_another_commit_are_measured_again(first_run, tmp_path):
    """Resume keeps only cases finished on the same commit; --fresh starts over."""
    import shutil

    suite, out, _, _ = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run = json.loads((copy / "run.json").read_text())
    run["cases"]["one"]["commit"] = "0" * 40
    (copy / "run.json").write_text(json.dumps(run))
    rc = main(["bench", "--suite", str(suite), "--out", str(copy), "--no-jax", "--repeats", "1",
               *FAST])
    assert rc == 0
    df = pd.read_parquet(copy / "records.parquet")
    one = df[df["case"] == "one"]
    assert set(one["side"]) == {"engine"} and set(one["repeat"]) == {-1, 0}  # measured again
    assert len(df[df["case"] == "p2"]) == len(pd.read_parquet(out / "records.parquet")
                                              .query("case == 'p2'"))  # kept
    rc = main(["bench", "--suite", str(suite), "--out", str(copy), "--no-jax", "--repeats", "1",
               "--case", "one", "--fresh", *FAST])
    assert rc == 0
    assert set(pd.read_parquet(copy / "records.parquet")["case"]) == {"one"}


@pytest.mark.skipif(bool(__import__("shutil").which("nvidia-smi")), reason="a GPU host runs it")
def test_cuda_case_without_a_gpu_says_why(tmp_path):
    """No CUDA here: the engine side is recorded as unavailable (not a crash), the JAX side
    fails with a hint, the case is failed and the exit code is 3."""
    text = SUITE.replace('tiers = ["model"]', 'tiers = ["model"]\nbackend = "cuda"\n'
                                              'dtype = "bf16"')
    (tmp_path / "s.toml").write_text(text)
    rc = main(["bench", "--suite", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"),
               "--case", "one", *FAST])
    assert rc == 3
    one = json.loads((tmp_path / "out" / "run.json").read_text())["cases"]["one"]
    assert one["engine"]["status"] == "unavailable"
    assert one["status"] == "failed" and "JAX sees no GPU" in one["error"]


def test_jax_memory_fraction_leaves_the_engine_what_its_ranks_held(tmp_path):
    """JAX's share of a GPU for a pipelined case: all but what the ranks held (+5% and 1 GiB),
    at most 95%; the default when the GPU's size or the engine's use is unknown, or when the
    engine leaves JAX under 20%."""
    from harness.bench import JobResult, jax_memory_fraction

    gib = 2**30
    env = {"gpus": [{"name": "H100", "memory_bytes": 80 * gib}]}

    def job(total, largest, devices):
        return JobResult([0.1], 0.0, 0.0, total, largest, 4, tmp_path, devices=devices)

    frac, why = jax_memory_fraction(job(20 * gib, 6 * gib, 1), env)  # 4 ranks on one GPU
    assert frac == pytest.approx((80 - 21 - 1) / 80) and "20.0 GiB per GPU" in why
    frac, _ = jax_memory_fraction(job(20 * gib, 6 * gib, 4), env)  # a GPU each: the largest rank
    assert frac == pytest.approx((80 - 6.3 - 1) / 80)
    assert jax_memory_fraction(job(gib // 8, gib // 8, 1), env)[0] == 0.95
    frac, why = jax_memory_fraction(job(70 * gib, 20 * gib, 1), env)
    assert frac is None and "too much to leave JAX a fair share" in why
    frac, why = jax_memory_fraction(job(20 * gib, 6 * gib, 1), {"gpus": [{"name": "H100"}]})
    assert frac is None and "unknown" in why


# ---- memory: each side's own counter, out of memory as a result, side order -------------------

def _one_case_suite(tmp_path):
    (tmp_path / "s.toml").write_text(SUITE)
    return str(tmp_path / "s.toml")


def test_memory_rows_are_each_sides_own_allocations(first_run):
    """The engine's peak is its allocation counter (parameters, grads, two moments and the
    activations: more than 4 copies of the parameters, far less than the process's RSS); JAX's
    on CPU is its compiled step's memory; both sources are named in run.json."""
    _, out, _, _ = first_run
    df = pd.read_parquet(out / "records.parquet")
    one = df[(df["case"] == "one") & (df["repeat"] == -1) & (df["metric"] == "peak_mem_bytes")]
    eng = one[one["side"] == "engine"]["value"].iloc[0]
    jax = one[one["side"] == "jax"]["value"].iloc[0]
    n_params = 2 * (12 * 32 * 32 + 13 * 32) + 64 * 32 + 16 * 32 + 2 * 32
    assert 4 * 4 * n_params < eng < 20e6
    assert 0 < jax < 50e6
    run = json.loads((out / "run.json").read_text())["cases"]["one"]
    assert "host_bytes" in run["engine"]["peak_mem_source"]
    assert run["engine"]["process_mem_bytes"] > eng  # the process holds Python, NumPy, ...
    assert "compiled memory analysis" in run["jax"]["peak_mem_source"]
    assert run["order"] == "alternate"


def test_jax_out_of_memory_is_a_result_with_labelled_fallbacks(tmp_path, monkeypatch, capsys):
    """JAX's own step does not fit (a memory limit just under what it needs): the case is done,
    not failed; the record says what the step asked for; the fallbacks are tried and the first
    that fits is the baseline, labelled; the report says so."""
    from harness import bench_jax

    suite = _one_case_suite(tmp_path)
    probe = tmp_path / "probe"
    assert main(["bench", "--suite", suite, "--out", str(probe), "--case", "one",
                 "--repeats", "1", *FAST]) == 0
    need = json.loads((probe / "run.json").read_text())["cases"]["one"]["jax_attempts"][0][
        "need_bytes"]
    monkeypatch.setenv(bench_jax.MEMORY_LIMIT_ENV, str(need - 1))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["bench", "--suite", suite, "--out", str(out), "--case", "one", *FAST]) == 0
    stdout = capsys.readouterr().out
    case = json.loads((out / "run.json").read_text())["cases"]["one"]
    assert case["status"] == "done"
    plain = case["jax_attempts"][0]
    assert plain["variant"] == "plain" and plain["status"] == "oom"
    assert plain["asked_bytes"] == need and plain["limit_bytes"] == need - 1
    assert "out of memory at B4" in plain["message"]
    fitted = [a for a in case["jax_attempts"] if a["status"] == "ok"]
    assert fitted and fitted[0]["variant"] in ("remat", "accum")
    assert case["jax_baseline"] == fitted[0]["baseline"]
    assert "+ remat" in case["jax_baseline"] or "+ accumulation over" in case["jax_baseline"]
    df = pd.read_parquet(out / "records.parquet")
    s = df[df["repeat"] == -1]
    asked = s[(s["side"] == "jax-plain") & (s["metric"] == "oom_asked_bytes")]["value"]
    assert list(asked) == [need]
    assert len(s[(s["side"] == "jax") & (s["metric"] == "tokens_per_s")]) == 1
    assert len(s[(s["side"] == "ratio") & (s["metric"] == "speedup")]) == 1
    for extra in fitted[1:]:  # every other variant that fit is its own labelled baseline
        side = f"jax-{extra['variant']}"
        assert len(s[(s["side"] == side) & (s["metric"] == "tokens_per_s")]) == 1
        assert f"also JAX baseline {side}" in stdout
    assert "JAX plain: out of memory at B4" in stdout
    from reports.build import build_report

    md = build_report([out], tmp_path / "report").parent / "report.md"
    assert "one: out of memory is a result here. JAX plain: out of memory at B4" in md.read_text()


def test_jax_out_of_memory_in_every_variant_leaves_no_jax_rows(tmp_path, monkeypatch, capsys):
    from harness import bench_jax

    monkeypatch.setenv(bench_jax.MEMORY_LIMIT_ENV, "1")
    out = tmp_path / "out"
    assert main(["bench", "--suite", _one_case_suite(tmp_path), "--out", str(out),
                 "--case", "one", "--repeats", "1", *FAST]) == 0
    stdout = capsys.readouterr().out
    case = json.loads((out / "run.json").read_text())["cases"]["one"]
    assert [a["variant"] for a in case["jax_attempts"]] == ["plain", "remat", "accum"]
    assert {a["status"] for a in case["jax_attempts"]} == {"oom"}
    assert any("JAX did not fit in any variant" in n for n in case["notes"])
    df = pd.read_parquet(out / "records.parquet")
    assert not df["side"].isin(["jax", "ratio"]).any()
    assert set(df[df["metric"] == "oom_asked_bytes"]["side"]) == {"jax-plain", "jax-remat",
                                                                  "jax-accum"}
    row = next(line for line in stdout.splitlines() if line.startswith("one "))
    assert "OOM (" in row


def test_engine_out_of_memory_retries_with_more_micro_batches(tmp_path, monkeypatch):
    """The engine's build fails with TD_ERR_NOMEM at micro-batch 4: recorded with what it asked
    for, then the same global batch over 2 micro-batches runs and is labelled."""
    from harness.errors import EngineError

    real = bench.InProcessEngine

    class Tight(real):
        def __init__(self, case, threads, microbatches=None):
            if (microbatches or 1) < 2:
                raise EngineError("td_model_build: cannot allocate 4 x 123456 bytes for 3 "
                                  "parameters. HINT: a smaller model", "TD_ERR_NOMEM")
            super().__init__(case, threads, microbatches)

    from harness import bench_case

    monkeypatch.setattr(bench_case, "InProcessEngine", Tight)  # run_case's lookup
    out = tmp_path / "out"
    assert main(["bench", "--suite", _one_case_suite(tmp_path), "--out", str(out),
                 "--case", "one", "--repeats", "1", "--no-jax", *FAST]) == 0
    case = json.loads((out / "run.json").read_text())["cases"]["one"]
    first = case["engine_attempts"][0]
    assert first["status"] == "oom" and first["micro_batches"] == 1
    assert first["asked_bytes"] == 4 * 123456 and "out of memory at B4" in first["message"]
    assert "gradient accumulation over 2 micro-batches" in case["engine_baseline"]
    df = pd.read_parquet(out / "records.parquet")
    s = df[(df["repeat"] == -1) & (df["side"] == "engine")]
    assert set(s["metric"]) >= {"tokens_per_s", "oom_asked_bytes"}


def test_side_order_and_its_bad_value(tmp_path, capsys):
    cpu = load_suite("cpu-smoke").cases[0]
    assert bench.resolve_order("auto", cpu) == "alternate"
    import dataclasses

    assert bench.resolve_order("auto", dataclasses.replace(cpu, backend="cuda")) == "separate"
    with pytest.raises(ConfigError, match="--order = 'sideways'"):
        bench.resolve_order("sideways", cpu)
    out = tmp_path / "out"
    assert main(["bench", "--suite", _one_case_suite(tmp_path), "--out", str(out),
                 "--case", "one", "--repeats", "2", "--order", "separate", *FAST]) == 0
    case = json.loads((out / "run.json").read_text())["cases"]["one"]
    assert case["order"] == "separate"
    df = pd.read_parquet(out / "records.parquet")
    assert set(df[(df["side"] == "ratio") & (df["metric"] == "speedup")]["repeat"]) == {-1, 0, 1}
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--suite", _one_case_suite(tmp_path), "--order", "x"])
    assert exc.value.code == 2 and "--order: invalid choice: 'x'" in capsys.readouterr().err


def test_out_of_memory_messages_are_parsed():
    from harness.bench_jax import _asked_bytes, _is_oom_error

    assert _asked_bytes("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                        "9.30GiB.") == int(9.30 * 2**30)
    assert _asked_bytes("Failed to allocate 1234 bytes") == 1234
    assert _asked_bytes("something else") is None
    assert _is_oom_error(RuntimeError("RESOURCE_EXHAUSTED: ...")) and not _is_oom_error(
        ValueError("bad shape"))
    assert bench._engine_asked_bytes("td_model_build: cudaMalloc of 1048576 bytes for the "
                                     "activations failed") == 1048576
