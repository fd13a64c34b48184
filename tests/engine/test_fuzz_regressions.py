"""Regression inputs of the engine's parsers (engine/fuzz/regressions/<target>/), each a file that
once crashed a parser, tripped a sanitizer or was silently misread, and the seed corpora.

Every input runs through its libFuzzer target (built by engine/fuzz/build.sh with clang under
ASan + UBSan; TANDEM_FUZZ_PRINT=1 makes the target print each parse's status and message): no
sanitizer report, and the parser's message says what is wrong. The safetensors inputs also go
through the public binding (no clang needed). Without clang the target tests skip, unless
TANDEM_REQUIRE_FUZZ=1 (CI sets it), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import engine
from harness.errors import EngineError

from engine_util import REPO

FUZZ = REPO / "engine" / "fuzz"
TARGETS = ("safetensors", "tokens", "schedule", "runfile")

# the model fuzz_safetensors.c loads into (one stage; also stage 1 of 2)
FUZZ_MODEL = dict(n_layer=2, n_embd=4, n_head=2, vocab_size=5, n_positions=4, seq_len=2,
                  batch_size=1)

# file -> the message its parse must give (a regex, matched against the target's report lines)
REGRESSIONS = {
    # the header ended inside an integer: strtoll read past the buffer (ASan heap-buffer-overflow)
    "safetensors/integer-at-header-end.safetensors":
        r"TD_ERR_FORMAT: .*malformed JSON header: expected '\]' at header byte 40",
    # shape [2^61] of F32: numel * 4 overflowed int64 (UBSan signed-integer-overflow)
    "safetensors/byte-size-overflow.safetensors":
        r"TD_ERR_FORMAT: .*tensor 'wte.weight' has 2305843009213693952 elements of 4 bytes, "
        r"more than a file can hold",
    # a 300-character row: fgets split it and its tail was read as a second action
    "schedule/long-line.csv": r"TD_ERR_FORMAT: schedule 'fuzz.csv' line 2: longer than 254",
    # sscanf's %d read stage 4294967296 as 0, and rank 4294967296 as rank 0
    "schedule/int-overflow.csv":
        r"TD_ERR_FORMAT: schedule 'fuzz.csv' line 2: cannot parse '0,0,F,4294967296,0'$",
    # sscanf ignored what followed the last field
    "schedule/trailing-junk.csv": r"TD_ERR_FORMAT: .* line 2: cannot parse '0,0,F,0,0junk'$",
    # a 2050-character path: its tail was read as a line of its own ("n_layer 99")
    "runfile/long-line.run": r"TD_ERR_CONFIG: run file 'fuzz.run' line 1: longer than 2046",
    # strtoll stopped at the 'x' and n_layer became 2
    "runfile/number-with-suffix.run": r"TD_ERR_CONFIG: .* line 1: n_layer='2x' is not a number$",
    # strtoll clamped to INT64_MAX
    "runfile/number-out-of-range.run":
        r"TD_ERR_CONFIG: .* line 1: steps='99999999999999999999' is not a number in range",
    # the empty field read as a 0-layer stage
    "runfile/layers-malformed.run": r"TD_ERR_CONFIG: .* layers='1,,2' is not a list",
}


def test_every_regression_file_has_an_expected_message():
    on_disk = {str(p.relative_to(FUZZ / "regressions")) for p in
               (FUZZ / "regressions").glob("*/*")}
    assert on_disk == set(REGRESSIONS)


@pytest.fixture(scope="module")
def fuzz_build(tmp_path_factory) -> Path:
    """The targets: $TANDEM_FUZZ_BUILD when it holds them, else built here with clang."""
    given = os.environ.get("TANDEM_FUZZ_BUILD")
    if given and all((Path(given) / f"fuzz_{t}").exists() for t in TARGETS):
        return Path(given)
    if shutil.which("clang") is None:
        msg = ("clang not found: the fuzz targets cannot be built. HINT: apt-get install -y "
               "clang (Debian's clang ships libFuzzer)")
        if os.environ.get("TANDEM_REQUIRE_FUZZ") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("fuzz-build")
    proc = subprocess.run(["bash", str(FUZZ / "build.sh"), str(out)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _run_target(build: Path, target: str, files: list[Path]) -> str:
    env = dict(os.environ, TANDEM_FUZZ_PRINT="1",
               ASAN_OPTIONS="detect_leaks=1:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    proc = subprocess.run([str(build / f"fuzz_{target}"), *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Sanitizer" not in out and "runtime error" not in out, out[-4000:]
    return out


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression_input_is_rejected_cleanly_by_its_target(fuzz_build, name):
    target = name.split("/")[0]
    out = _run_target(fuzz_build, target, [FUZZ / "regressions" / name])
    reports = [ln for ln in out.splitlines() if ": TD_" in ln]
    assert reports, out[-2000:]
    for line in reports:  # every parse of the input (each rank, each model) says the same
        assert re.search(REGRESSIONS[name], line), f"{line!r} !~ {REGRESSIONS[name]!r}"


@pytest.mark.parametrize("target", TARGETS)
def test_seed_corpus_runs_clean(fuzz_build, target):
    files = sorted((FUZZ / "corpus" / target).iterdir())
    assert files
    out = _run_target(fuzz_build, target, files)
    # the valid seeds parse: at least one report says ok
    assert re.search(r": TD_OK: ok$", out, re.M), out[-2000:]


@pytest.mark.parametrize("name", [n for n in sorted(REGRESSIONS) if n.startswith("safetensors/")])
def test_safetensors_regression_through_the_binding(tmp_path, name):
    expected = REGRESSIONS[name].split(": ", 1)[1].replace("'fuzz.safetensors'", "")
    with engine.Model(**FUZZ_MODEL) as m:
        before = m.params()
        with pytest.raises(EngineError, match=expected):
            m.load_safetensors(FUZZ / "regressions" / name)
        after = m.params()  # a failed load leaves the parameters as they were
    assert all((before[k] == after[k]).all() for k in before)
