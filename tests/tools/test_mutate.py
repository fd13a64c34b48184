"""tools/mutate.py and tools/mutants.toml: the list parses, every mutant still applies to the
current sources (a refactor that stales one fails here), stale or ambiguous find strings are
refused with a message naming the mutant, and `--list` works. Nothing is built or run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "mutate.py"


def _load():
    spec = importlib.util.spec_from_file_location("tools_mutate", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


mutate = _load()


def test_mutant_list_parses_with_enough_bugs():
    ms = mutate.load_mutants()
    assert len(ms) >= 24
    assert len({m.name for m in ms}) == len(ms)
    files = {m.file for m in ms}
    assert {"engine/src/kernels.c", "engine/src/gemm.c", "engine/src/optim.c",
            "engine/runtime/runtime.c"} <= files
    for m in ms:
        assert m.models and m.find != m.replace


@pytest.mark.parametrize("m", mutate.load_mutants(), ids=lambda m: m.name)
def test_every_find_string_occurs_exactly_once(m):
    text = (REPO / m.file).read_text(encoding="utf-8")
    assert text.count(m.find) == 1, (
        f"mutant {m.name!r} is stale: its find string occurs {text.count(m.find)} times in "
        f"{m.file}; update tools/mutants.toml")


def test_check_all_passes_on_the_sources():
    mutate.check_all(mutate.load_mutants())


LLAMA_MUTANTS = REPO / "tools" / "mutants-llama.toml"  # for suites/llama-smoke.toml


@pytest.mark.parametrize("m", mutate.load_mutants(LLAMA_MUTANTS), ids=lambda m: m.name)
def test_every_llama_find_string_occurs_exactly_once(m):
    assert m.models and m.find != m.replace
    text = (REPO / m.file).read_text(encoding="utf-8")
    assert text.count(m.find) == 1, (
        f"mutant {m.name!r} is stale: its find string occurs {text.count(m.find)} times in "
        f"{m.file}; update tools/mutants-llama.toml")


def _one(find: str) -> object:
    return mutate.Mutant(name="planted", file="engine/src/x.c", find=find, replace="Y",
                         models="a test")


def test_apply_refuses_missing_and_duplicated_find():
    assert mutate.apply("a X b", _one("X")) == "a Y b"
    with pytest.raises(mutate.MutantError, match=r"mutant 'planted': find string not found in "
                                                 r"engine/src/x\.c .*exactly once"):
        mutate.apply("a b", _one("X"))
    with pytest.raises(mutate.MutantError, match=r"mutant 'planted': find string found 2 "
                                                 r"times in engine/src/x\.c"):
        mutate.apply("X X", _one("X"))


def test_check_all_names_every_stale_mutant(tmp_path):
    (tmp_path / "engine" / "src").mkdir(parents=True)
    (tmp_path / "engine" / "src" / "x.c").write_text("X X Z\n")
    ms = [mutate.Mutant("dup", "engine/src/x.c", "X", "Y", "m"),
          mutate.Mutant("gone", "engine/src/x.c", "Q", "Y", "m"),
          mutate.Mutant("ok", "engine/src/x.c", "Z", "Y", "m"),
          mutate.Mutant("nofile", "engine/src/nope.c", "Z", "Y", "m")]
    with pytest.raises(mutate.MutantError) as e:
        mutate.check_all(ms, tmp_path)
    msg = str(e.value)
    assert "'dup': find string found 2 times" in msg and "'gone': find string not found" in msg
    assert "'nofile': engine/src/nope.c does not exist" in msg and "'ok'" not in msg


@pytest.mark.parametrize("body, match", [
    ('[[mutant]]\nname = "a"\nfile = "engine/src/x.c"\nfind = "X"\nreplace = "Y"\n',
     r"missing keys \['models'\]"),
    ('[[mutant]]\nname = "a"\nfile = "engine/src/x.c"\nfind = "X"\nreplace = "X"\n'
     'models = "m"\n', "replace equals find"),
    ('[[mutant]]\nname = "a"\nfile = "src/x.c"\nfind = "X"\nreplace = "Y"\nmodels = "m"\n',
     "must be a path under engine/"),
    ('[[mutant]]\nname = "a"\nfile = "engine/x.c"\nfind = "X"\nreplace = "Y"\nmodels = "m"\n'
     '[[mutant]]\nname = "a"\nfile = "engine/x.c"\nfind = "Z"\nreplace = "Y"\nmodels = "m"\n',
     "duplicate name 'a'"),
    ("name = 1\n", r"no \[\[mutant\]\] tables"),
    ("[[mutant\n", "cannot read the mutant list"),
])
def test_bad_mutant_lists_are_refused(tmp_path, body, match):
    p = tmp_path / "m.toml"
    p.write_text(body)
    with pytest.raises(mutate.MutantError, match=match):
        mutate.load_mutants(p)


def test_cli_list_and_stale_mutant_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, str(TOOL), "--list"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == [m.name for m in mutate.load_mutants()]
    stale = tmp_path / "stale.toml"
    stale.write_text('[[mutant]]\nname = "stale"\nfile = "engine/src/kernels.c"\n'
                     'find = "this text is not in the engine"\nreplace = "Y"\nmodels = "m"\n')
    r = subprocess.run([sys.executable, str(TOOL), "--list", "--mutants", str(stale)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "mutant 'stale': find string not found in engine/src/kernels.c" in r.stderr
    r = subprocess.run([sys.executable, str(TOOL), "--list", "--only", "no-such-mutant"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown mutants ['no-such-mutant']" in r.stderr


def test_classify_and_summary():
    assert [mutate.classify(rc) for rc in (0, 1, 3, None, -9)] == [
        "survived", "killed", "crash", "crash", "crash"]
    out = [mutate.Outcome("a", "engine/src/x.c", "m", r, rc, 1.0, 0.5)
           for r, rc in (("killed", 1), ("crash", 3), ("survived", 0), ("build-error", None))]
    s = mutate.summary(out)
    assert (s["killed"], s["crash"], s["survived"], s["build-error"]) == (1, 1, 1, 1)
    assert s["kill_rate"] == 0.5 and s["survivors"] == ["a"]
    md = mutate.markdown(out, mutate.Outcome("control", "", "", "control-pass", 0, 9.0, 3.0),
                         "smoke", 20.0)
    assert "Kill rate 50.0%" in md and "| a | src/x.c | survived |" in md
