"""Tests of `tandem report`: figures written and referenced, tables, compare verdicts, bad input,
the CLI, and the report loaded in headless Chromium (skipped without a browser, unless
TANDEM_REQUIRE_BROWSER=1, as in CI, where a missing browser fails).

What it is: end-to-end tests over synthetic results directories (conftest.py) plus unit tests
of the derivations. What it is not: a check of how the figures look — that is done by eye.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main as tandem
from harness.errors import ConfigError, DataError
from reports import build_report, compare
from reports.load import load, summarize, tensor_group
from reports.browser_check import MIN_INK, BrowserCheckError, check_report
from reports.screenshot import ScreenshotError, find_browser, screenshot
from reports.screenshot import main as screenshot_main

EXPECTED_FIGURES = [
    "speedup.png", "throughput.png", "mfu.png", "scaling_stages.png",
    "scaling_microbatches.png", "scaling_model_size.png", "bubble.png",
    "timeline_tiny-1f1b-p2-m4.png", "timeline_tiny-zbh1-p2-m4.png", "parity.png", "losses.png",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    index = build_report([results["gpu"], results["cpu"]], out)
    assert index == out / "index.html"
    return out


# --- the full report ---------------------------------------------------------------------------

def test_every_figure_is_written_and_referenced(report):
    html = (report / "index.html").read_text()
    md = (report / "report.md").read_text()
    written = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert sorted(EXPECTED_FIGURES) == written
    for name in written:
        data = (report / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f'src="figures/{name}"' in html, name
        assert f"(figures/{name})" in md, name


def test_html_is_self_contained(report):
    html = (report / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert refs, "no relative links at all"
    for ref in refs:
        assert not re.match(r"^[a-z]+:", ref), f"external or absolute reference {ref}"
        assert (report / ref).exists(), f"dangling reference {ref}"
    assert "<style>" in html and "<script" not in html and "<link" not in html


def test_traces_are_copied_and_linked(report):
    for name in ("tiny-1f1b-p2-m4.json", "tiny-zbh1-p2-m4.json"):
        assert (report / "traces" / name).exists()
        assert f'href="traces/{name}"' in (report / "index.html").read_text()
        assert f"(traces/{name})" in (report / "report.md").read_text()
    assert "ui.perfetto.dev" in (report / "index.html").read_text()


def test_tables_carry_environment_bench_and_parity(report):
    for text in ((report / "index.html").read_text(), (report / "report.md").read_text()):
        # environment: both machines, the peak and its source, both FLOPs formulas
        assert "h200-node-07" in text and "ci-runner-2" in text
        assert "989 TFLOP/s" in text and "datasheet H200 SXM bf16 dense" in text
        assert "measured fp32 GEMM" in text
        assert "6·N + 6·L·T·C" in text and "6·N + 12·L·T·C" in text
        # bench: every case, speedup with spread, MiB
        for case in ("gpt2-124m", "gpt2-1.5b-zbh1-p4-m8", "tiny", "small"):
            assert case in text
        assert re.search(r"1\.\d\d× \(1\.\d\d–1\.\d\d\)", text)
        assert "peak MiB engine" in text
        # parity: the planted failure, named with its share
        assert "grad/h.1.mlp.c_fc.weight" in text and "FAIL" in text and "1.7" in text
    html = (report / "index.html").read_text()
    assert re.search(r'<tr class="bad"><td[^>]*>tiny-1f1b-p2-m4</td>', html)


def test_bubble_table_gives_measured_simulated_and_theory(report):
    md = (report / "report.md").read_text()
    lines = md.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("| case | device | bubble measured"))
    assert lines[at].split("|")[3:6] == [" bubble measured ", " bubble simulated ",
                                         " bubble theory "]
    row = next(l for l in lines[at:] if l.startswith("| gpt2-1.5b-zbh1-p4-m8 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # the fixture: theory (p-1)/(m+p-1)/3 = 9.1%, simulated 1.25 points above it
    assert cells[3] == "10.3%" and cells[4] == "9.1%", cells


def test_bubble_per_rank_table_from_run_json(report):
    md = (report / "report.md").read_text()
    assert "Bubble per rank" in md
    rows = [l for l in md.splitlines() if l.startswith("| tiny-1f1b-p2-m4 | ")]
    cells = [[c.strip() for c in l.split("|")[1:-1]] for l in rows]
    # rank 0 has a device counter in the fixture, rank 1 none
    assert ["tiny-1f1b-p2-m4", "0", "21.2%", "20.0%", "+1.2", "3,072"] in cells, cells
    assert ["tiny-1f1b-p2-m4", "1", "19.0%", "18.5%", "+0.5", "—"] in cells, cells


def test_headline_and_loss_facts(report):
    html = (report / "index.html").read_text()
    assert "115/116" in html  # parity tensors within tolerance
    # the real-text case visibly falls; its numbers are in the caption
    m = re.search(r"tiny-shakespeare: engine loss ([\d.]+) → ([\d.]+)", html)
    assert m and float(m.group(1)) - float(m.group(2)) > 2.0


def test_headline_gives_a_verdict_per_case_not_a_median(report):
    """Unlike cases (one stage, pipelined, CPU, GPU) never share one headline number: each of the
    first cases gets its own verdict with its interval, the rest are counted."""
    md = (report / "report.md").read_text()
    head = md.split("<a id=", 1)[0]
    assert "median engine" not in head
    verdicts = re.findall(r"\*\*([\d.]+)×\*\* (\S+): (engine|JAX) faster, engine ÷ JAX tokens/s "
                          r"([\d.]+)×", head)
    assert verdicts, head
    for shown, _case, who, value in verdicts:
        assert shown == value and (who == "engine") == (float(value) >= 1)


def test_missing_data_is_said_not_drawn(results, tmp_path):
    only = tmp_path / "parity-only"
    only.mkdir()
    shutil.copy(results["cpu"] / "parity.parquet", only / "parity.parquet")
    out = tmp_path / "out"
    build_report([only], out)
    html, md = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["parity.png"]
    for text in (html, md):
        assert "no bench records" in text
        assert "no loss curves" in text
        assert "no timelines" in text
        assert "no Perfetto traces" in text


def test_parity_run_json_listing_its_cases_beside_a_bench_oom(results, tmp_path):
    """parity's run.json lists its case names, bench's maps each case to its attempts: a report
    over both builds, and the bench side's out-of-memory note is in it."""
    import json

    par = tmp_path / "parity"
    par.mkdir()
    shutil.copy(results["cpu"] / "parity.parquet", par / "parity.parquet")
    (par / "run.json").write_text(json.dumps({"cases": ["tiny", "text-bytes"]}))
    bench = tmp_path / "bench"
    shutil.copytree(results["gpu"], bench)
    run = json.loads((bench / "run.json").read_text())
    run["cases"] = {"gpt2-1.5b": {"jax_attempts": [
        {"variant": "plain", "status": "oom", "message": "out of memory at B8 (asked 90.1 GiB)"},
        {"variant": "remat", "status": "ok", "baseline": "jax-remat"}]}}
    (bench / "run.json").write_text(json.dumps(run))
    out = tmp_path / "out"
    build_report([par, bench], out)
    assert "JAX plain: out of memory at B8 (asked 90.1 GiB)" in (out / "report.md").read_text()


def test_rebuild_removes_stale_figures(results, tmp_path):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(PNG_MAGIC)
    only = tmp_path / "p"
    only.mkdir()
    shutil.copy(results["cpu"] / "parity.parquet", only / "parity.parquet")
    build_report([only], out)
    assert not (out / "figures" / "stale.png").exists()


# --- derivations -------------------------------------------------------------------------------

def test_summary_from_raw_repeats_is_median_and_quartiles():
    raw = pd.DataFrame({
        "source": "s", "case": "c", "label": "c", "side": "engine", "metric": "tokens_per_s",
        "unit": "tokens/s", "value": [1.0, 2.0, 3.0, 4.0, 100.0], "repeat": range(5),
        "spread_lo": float("nan"), "spread_hi": float("nan"), "vocab_size": 10, "n_embd": 4,
        "n_layer": 1,
    })
    s = summarize(raw).iloc[0]
    assert (s["value"], s["spread_lo"], s["spread_hi"], s["n"]) == (3.0, 2.0, 4.0, 5)


def test_speedup_is_derived_when_not_stored(results):
    res = load([results["cpu"]])
    s = summarize(res.records[res.records["metric"] != "speedup"])
    sp = s[(s["metric"] == "speedup") & (s["label"] == "tiny")].iloc[0]
    assert sp["derived"] and sp["value"] == pytest.approx(13.9e3 / 10.3e3, rel=0.1)


@pytest.mark.parametrize("tensor,tier,group", [
    ("grad/h.3.attn.c_attn.weight", "model", "attn (grad)"),
    ("grad/h.0.mlp.c_proj.bias", "schedule", "mlp (grad)"),
    ("param/h.11.ln_2.weight", "trajectory", "ln (param)"),
    ("grad/ln_f.bias", "model", "ln (grad)"),
    ("param/wte.weight", "trajectory", "embedding (param)"),
    ("loss", "model", "loss"),
    ("loss@step3", "trajectory", "loss"),
    ("logits", "model", "logits"),
    ("op/layernorm.dx", "op", "op: layernorm"),
])
def test_tensor_groups(tensor, tier, group):
    assert tensor_group(tensor, tier) == group


# --- compare -----------------------------------------------------------------------------------

def test_compare_flags_planted_regression_only(results, tmp_path):
    out = tmp_path / "cmp"
    index = compare(results["gpu"], results["gpu_slow"], out, threshold=1.10)
    assert index == out / "index.html"
    d = pd.read_csv(out / "compare.csv").set_index(["label", "side", "metric"])
    assert d.loc[("gpt2-124m", "engine", "tokens_per_s"), "verdict"] == "regression"
    assert d.loc[("gpt2-124m", "engine", "step_ms"), "verdict"] == "regression"
    assert d.loc[("gpt2-124m", "ratio", "speedup"), "verdict"] == "regression"
    assert d.loc[("gpt2-350m", "engine", "tokens_per_s"), "verdict"] == "same"
    assert d.loc[("gpt2-124m", "jax", "tokens_per_s"), "verdict"] == "same"
    assert pd.isna(d.loc[("gpt2-1.5b-1f1b-p4-m8", "theory", "bubble"), "verdict"])
    flagged = {k for k, v in d["verdict"].items() if v == "regression"}
    assert all(k[0] == "gpt2-124m" for k in flagged)
    html, md = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert re.search(r'<tr class="bad"><td[^>]*>gpt2-124m</td><td[^>]*>engine</td>'
                     r'<td[^>]*>tokens_per_s</td>', html)
    assert "| **gpt2-124m** | **engine** | **tokens_per_s** |" in md
    assert "**REGRESSION**" in md
    assert (out / "figures" / "compare.png").exists() and "figures/compare.png" in html
    assert "(figures/compare.png)" in md


def test_compare_unchanged_run_has_no_regression(results, tmp_path):
    compare(results["gpu"], results["gpu"], tmp_path / "same")
    d = pd.read_csv(tmp_path / "same" / "compare.csv")
    assert (d["verdict"] == "regression").sum() == 0
    assert "REGRESSION" not in (tmp_path / "same" / "report.md").read_text()


def test_compare_rejects_threshold_not_above_one(results, tmp_path):
    with pytest.raises(ConfigError, match="threshold"):
        compare(results["gpu"], results["gpu"], tmp_path / "x", threshold=0.9)


# --- bad input ---------------------------------------------------------------------------------

def test_missing_dir_raises_data_error_naming_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        build_report([missing], tmp_path / "out")


def test_empty_dir_raises_data_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"no results in {re.escape(str(empty))}"):
        build_report([empty], tmp_path / "out")


def test_compare_with_missing_dir_raises(results, tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "gone"))):
        compare(results["gpu"], tmp_path / "gone", tmp_path / "out")


def test_corrupt_table_raises_naming_the_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "records.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=re.escape(str(d / "records.parquet"))):
        build_report([d], tmp_path / "out")


def test_table_missing_columns_raises(tmp_path):
    d = tmp_path / "cols"
    d.mkdir()
    pd.DataFrame({"case": ["a"], "value": [1.0]}).to_parquet(d / "records.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['side', 'metric'\]"):
        build_report([d], tmp_path / "out")


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_report_returns_0_and_prints_index(results, tmp_path, capsys):
    out = tmp_path / "cli"
    assert tandem(["report", str(results["cpu"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "index.html")
    assert (out / "index.html").exists() and (out / "report.md").exists()


def test_cli_bad_input_exits_2_with_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert tandem(["report", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_compare_exits_1_on_regression_0_otherwise(results, tmp_path, capsys):
    args = ["report", "--compare", str(results["gpu"]), str(results["gpu_slow"]), "--out"]
    assert tandem(args + [str(tmp_path / "a")]) == 1
    assert "regression" in capsys.readouterr().err
    assert tandem(args + [str(tmp_path / "b"), "--threshold", "2.5"]) == 0


def test_cli_needs_dirs_or_compare(tmp_path, capsys):
    assert tandem(["report", "--out", str(tmp_path / "o")]) == 2
    assert "no results directory given" in capsys.readouterr().err


# --- screenshot --------------------------------------------------------------------------------

def test_screenshot_without_browser_says_so(report, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ScreenshotError, match="no headless Chromium on PATH"):
        screenshot(report / "index.html", tmp_path / "s.png")


def test_blank_and_drawn_pictures_are_told_apart():
    from PIL import Image, ImageDraw

    from reports.browser_check import _ink

    white = Image.new("RGB", (300, 200), "white")
    assert _ink(white) == (0.0, 0.0)
    drawn = white.copy()
    ImageDraw.Draw(drawn).rectangle((20, 20, 120, 150), fill=(31, 119, 180))
    ink, sd = _ink(drawn)
    assert 0.2 < ink < 0.25 and sd > 20


@pytest.fixture
def browser() -> str:
    path = find_browser()
    if path is None:
        msg = "no chromium/chromium-browser/google-chrome on PATH"
        if os.environ.get("TANDEM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{msg}, and TANDEM_REQUIRE_BROWSER=1 says the browser check must run "
                        "(.ci/run installs Debian's chromium)")
        pytest.skip(f"{msg} (apt-get install chromium to run this test)")
    return path


@pytest.mark.slow
def test_report_passes_its_browser_check(report, browser, tmp_path):
    """The real report in a real browser: no console error or failed load, every figure loaded
    at its file's own size and drawn (not blank) in a full-page screenshot."""
    from PIL import Image

    r = check_report(report / "index.html", tmp_path / "shot.png", browser=browser)
    assert r.problems == [] and r.console_errors == []
    assert [Path(f.src).name for f in r.figures] == [
        n for n in re.findall(r'src="figures/([^"]+)"', (report / "index.html").read_text())]
    assert sorted(Path(f.src).name for f in r.figures) == sorted(EXPECTED_FIGURES)
    for f in r.figures:
        assert f.loaded and f.natural == Image.open(report / f.src).size, f
        assert f.ink > 5 * MIN_INK, f
    shot = Image.open(r.png)
    assert shot.width == 1400 and shot.height > 700 * len(EXPECTED_FIGURES)
    assert r.page_ink > 5 * MIN_INK


@pytest.mark.slow
def test_browser_check_names_every_fault_in_a_broken_report(report, browser, tmp_path):
    """A copy of the report with four planted faults: each is named, and the check raises."""
    from PIL import Image

    bad = tmp_path / "broken"
    shutil.copytree(report, bad)
    (bad / "figures" / "mfu.png").unlink()  # a dangling figure reference
    (bad / "figures" / "bubble.png").write_bytes(PNG_MAGIC + b"truncated")  # undecodable
    size = Image.open(bad / "figures" / "parity.png").size
    Image.new("RGB", size, "white").save(bad / "figures" / "parity.png")  # loads, but blank
    html = (bad / "index.html").read_text()
    (bad / "index.html").write_text(html.replace(
        "</main>", "</main><script>drawFigures();</script>"))  # a script error
    with pytest.raises(BrowserCheckError, match=r"failed its browser check \(5 problem") as e:
        check_report(bad / "index.html", tmp_path / "shot.png", browser=browser)
    msg = str(e.value)
    assert re.search(r"failed to load file://\S+/figures/mfu\.png: net::ERR_FILE_NOT_FOUND", msg)
    assert "figure 'MFU' (figures/mfu.png) did not load" in msg
    assert "figure 'Bubble per schedule' (figures/bubble.png) did not load" in msg
    assert re.search(r"figure 'Parity by tensor group' \(figures/parity\.png\) is blank in "
                     r"the screenshot \(0\.\d\d% of its pixels", msg)
    assert re.search(r"uncaught exception: ReferenceError: drawFigures is not defined", msg)
    assert (tmp_path / "shot.png").exists()  # written all the same, for a look


@pytest.mark.slow
def test_screenshot_command_exits_1_naming_the_broken_figure(report, browser, tmp_path, capsys):
    bad = tmp_path / "broken"
    shutil.copytree(report, bad)
    (bad / "figures" / "losses.png").unlink()
    assert screenshot_main([str(bad / "index.html"), str(tmp_path / "s.png")]) == 1
    err = capsys.readouterr().err
    assert "10/11 figure(s) loaded" in err and "figure 'Loss curves' (figures/losses.png)" in err


def test_compare_reports_parity_changes(results, tmp_path):
    new = tmp_path / "cpu-fixed"
    shutil.copytree(results["cpu"], new)
    p = pd.read_parquet(new / "parity.parquet")
    fix = p["tensor"] == "grad/h.1.mlp.c_fc.weight"
    p.loc[fix, ["share", "passed"]] = [0.3, True]
    p.loc[p["tensor"] == "logits", ["share", "passed"]] = [2.5, False]
    p.to_parquet(new / "parity.parquet", index=False)
    compare(results["cpu"], new, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"\*\*tiny-model\*\* \| \*\*model\*\* \| \*\*logits\*\* .*newly FAILING", md)
    assert re.search(r"tiny-1f1b-p2-m4 \| schedule \| grad/h.1.mlp.c_fc.weight .*fixed", md)


def test_compare_of_disjoint_runs_warns(results, tmp_path):
    compare(results["cpu"], results["gpu"], tmp_path / "out")
    assert "nothing could be judged" in (tmp_path / "out" / "report.md").read_text()


def test_environment_says_how_the_engine_threads_waited(results, tmp_path):
    """bench records the engine's OpenMP wait per case; the report's environment table shows it
    (spin or none moves a small model's step by up to ~1.7x), and leaves the row out when no
    case recorded one."""
    import json

    bench = tmp_path / "bench"
    shutil.copytree(results["cpu"], bench)
    out = tmp_path / "out"
    build_report([bench], out)
    assert "engine OpenMP wait" not in (out / "report.md").read_text()
    run = json.loads((bench / "run.json").read_text())
    run["cases"] = {"tiny": {"engine": {"omp_wait": {
        "libgomp_preloaded": False, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}}},
        "small": {"engine": {"omp_wait": {
            "libgomp_preloaded": False, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}}}}
    (bench / "run.json").write_text(json.dumps(run))
    build_report([bench], out)
    row = next(line for line in (out / "report.md").read_text().splitlines()
               if "engine OpenMP wait" in line)
    assert "OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=1000" in row
    assert "GOMP_SPINCOUNT=unset (no spin)" in row
