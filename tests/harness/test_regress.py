"""tandem regress: the gate's rules and exit codes, and (slow) the gate itself on this checkout:
a planted 2x engine slowdown (TANDEM_SLOWDOWN=2 on the HEAD side) fails it naming the metric,
the same commit measured twice passes. Skips without asv or outside a git checkout."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("asv")

from harness import regress  # noqa: E402
from harness.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _in_git_checkout() -> bool:
    if not shutil.which("git"):
        return False
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", "HEAD"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and (ROOT / "asv.conf.json").is_file()


needs_checkout = pytest.mark.skipif(not _in_git_checkout(),
                                    reason="needs the git checkout with asv.conf.json")


# ---- rules (fast) ------------------------------------------------------------------------------


def test_gates_cover_the_suite_with_ratio_tighter_than_raw_times():
    ratio = regress.gate_for("bench_ratio.EngineOverJax.track_time_ratio")
    raw = regress.gate_for("bench_engine.EngineStep.track_ms_per_step")
    instr = regress.gate_for("bench_instr.EngineInstructions.track_instructions_per_step")
    assert ratio.factor == 1.5 and instr.factor == 1.25
    assert raw.factor > ratio.factor
    assert ratio.factor < 2.0 and instr.factor < 2.0  # a 2x slowdown must fail the gate
    assert regress.gate_for("bench_jax.JaxStep.track_ms_per_step").factor == raw.factor
    assert regress.gate_for("bench_engine.PipelineStep.track_ms_per_step").factor > raw.factor
    assert regress.gate_for("bench_future.Thing.track_x") is None  # new areas: history only
    assert regress.gate_for("bench_engine.EngineStep.track_ms_per_step", 3.0).factor == 3.0


def test_verdicts():
    nan = math.nan
    base = {"bench_ratio.EngineOverJax.track_time_ratio('tiny')": (1.0, "engine/JAX"),
            "bench_engine.EngineStep.track_ms_per_step('tiny')": (10.0, "ms/step"),
            "bench_jax.JaxStep.track_ms_per_step('tiny')": (5.0, "ms/step"),
            "bench_instr.EngineInstructions.track_instructions_per_step('tiny')": (100.0, "M"),
            "bench_future.Thing.track_x('p')": (10.0, "ms/step")}
    head = {"bench_ratio.EngineOverJax.track_time_ratio('tiny')": (1.6, "engine/JAX"),
            "bench_engine.EngineStep.track_ms_per_step('tiny')": (20.0, "ms/step"),
            "bench_jax.JaxStep.track_ms_per_step('tiny')": (None, "ms/step"),
            "bench_instr.EngineInstructions.track_instructions_per_step('tiny')": (nan, "M"),
            "bench_future.Thing.track_x('p')": (100.0, "ms/step")}
    rows = {r.name.split(".")[0] + "." + r.name.split(".")[1]: r
            for r in regress.compare(base, head)}
    assert rows["bench_ratio.EngineOverJax"].verdict == "WORSE"  # 1.6 > 1.5
    assert rows["bench_engine.EngineStep"].verdict == "ok"  # 2.0 is within x2.5
    assert rows["bench_jax.JaxStep"].verdict == "FAILED in HEAD"
    assert rows["bench_instr.EngineInstructions"].verdict == "skipped in HEAD"
    assert rows["bench_future.Thing"].verdict == "not gated"
    assert {r.name for r in regress.compare(base, head) if r.fails} == {
        "bench_ratio.EngineOverJax.track_time_ratio('tiny')",
        "bench_jax.JaxStep.track_ms_per_step('tiny')"}
    table = regress.format_gate(regress.compare(base, head), "a" * 40, "b" * 40)
    assert "WORSE" in table and "x1.5" in table


def test_confirm_rounds_select_exactly_the_failing_results():
    import re

    names = ["bench_ratio.EngineOverJax.track_time_ratio('tiny')", "bench_x.track_y"]
    rx = regress._exact_regex(names)
    assert all(re.search(rx, n) for n in names)  # asv matches "name(params)" against --bench
    assert not re.search(rx, "bench_ratio.EngineOverJax.track_time_ratio('other')")


@needs_checkout
def test_unknown_commit_is_bad_input(capsys):
    assert main(["regress", "no-such-rev-xyz", "HEAD", "--repo", str(ROOT)]) == 2
    assert "no-such-rev-xyz" in capsys.readouterr().err
    assert main(["regress", "HEAD", "0123456789abcdef0123", "--repo", str(ROOT)]) == 2
    assert "0123456789abcdef0123" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [(["--factor", "0.9"], "--factor"),
                                           (["--head-env", "NOEQUALS"], "--head-env"),
                                           (["--bench-regex", "("], "--bench-regex")])
def test_bad_options_are_bad_input(capsys, extra, needle):
    assert main(["regress", "HEAD", "HEAD", "--repo", str(ROOT), *extra]) == 2
    assert needle in capsys.readouterr().err


@needs_checkout
def test_build_key_ignores_docs_only_changes():
    sha = regress.resolve_commit(ROOT, "HEAD")
    assert regress.build_key(ROOT, sha) == regress.build_key(ROOT, "HEAD")
    assert len(regress.build_key(ROOT, sha)) == 16


# ---- the gate end to end (slow: builds HEAD once, four short asv runs) --------------------------

RATIO = r"^bench_ratio\.EngineOverJax\."  # the one-stage engine/JAX ratio: fast and robust


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("regress")  # one install of HEAD shared by both tests


@needs_checkout
@pytest.mark.slow
def test_planted_2x_slowdown_fails_the_gate(work_dir, capfd):
    rc = main(["regress", "HEAD", "HEAD", "--repo", str(ROOT), "--work-dir", str(work_dir),
               "--bench-regex", RATIO, "--quick", "--head-env", "TANDEM_SLOWDOWN=2"])
    out = capfd.readouterr().out
    assert rc == 1, out[-3000:]
    assert "regress: FAIL" in out
    assert "bench_ratio.EngineOverJax.track_time_ratio('tiny')" in out.split("regress: FAIL")[1]


@needs_checkout
@pytest.mark.slow
def test_unchanged_pair_passes_the_gate(work_dir, capfd):
    rc = main(["regress", "HEAD", "HEAD", "--repo", str(ROOT), "--work-dir", str(work_dir),
               "--bench-regex", RATIO, "--quick"])
    out = capfd.readouterr().out
    assert rc == 0, out[-3000:]
    assert "regress: OK" in out
    assert "bench_ratio.EngineOverJax.track_time_ratio('tiny')" in out
