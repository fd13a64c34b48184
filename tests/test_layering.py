"""The repository's layering, checked (docs/architecture.md has the picture and the reasons).

Python imports go one way: reference <- harness <- reports, suites <- tools; tests may import
anything, nothing imports tools or tests, and engine/ holds no Python. In engine/src every file's
#include "..." lines and its calls into other files follow a declared order of layers. Each
checker also runs on a small synthetic tree with planted violations: a check that cannot fail is
a defect. Not here: style, sizes of files, anything that needs a build.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ---- Python: who may import whom ---------------------------------------------------------------

PACKAGES = ("reference", "harness", "reports", "suites", "tools", "tests")
MAY_IMPORT = {
    "reference": {"reference"},
    "harness": {"harness", "reference"},
    "reports": {"reports", "harness", "reference"},
    "suites": {"suites", "harness", "reference"},
    "tools": {"tools", "harness", "reference", "reports", "suites"},
    "tests": set(PACKAGES),
}
# (file, module it names) -> why the arrow against the layering is allowed
PY_EXCEPTIONS = {
    ("harness/cli.py", "reports.cli"):
        "the `tandem` command table names every subcommand's module as a string and imports it "
        "only when that command runs (`tandem report`, and `tandem run`'s report step); moving "
        "the command table above reports would move the installed entry point",
}
# Python files under engine/ that are allowed for now -> why
ENGINE_PY_EXCEPTIONS: dict[str, str] = {}


def tracked_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files git tracks under root (what CI checks out), else every file on disk."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True,
                             check=True).stdout.decode()
        files = [root / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in root.rglob("*") if p.is_file()]
    return sorted(p for p in files if p.suffix in suffixes and p.is_file()
                  and not any(part.startswith(".") or part == "build"
                              for part in p.relative_to(root).parts[:-1]))


def _is_module(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(tree: ast.AST, root: Path):
    """(line, module, how) for every import statement, import_module / __import__ call with a
    literal name, and string constant that names a module of the repository (a command table
    or a `need("harness.x")` resolves it by name at run time: still an arrow)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, "import"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module, "import"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value, "dynamic import"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"[a-z_]+(\.[A-Za-z_]\w*)+", node.value) \
                and node.value.split(".")[0] in PACKAGES and _is_module(root, node.value):
            yield node.lineno, node.value, "module named by string"


def python_violations(root: Path, exceptions=PY_EXCEPTIONS,
                      engine_exceptions=ENGINE_PY_EXCEPTIONS) -> tuple[list[str], set]:
    """Messages "file:line: arrow (rule)" for every import against the layering, and the
    exceptions that were used (an exception nothing needs any more is stale)."""
    bad, used = [], set()
    for path in tracked_files(root, (".py",)):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/")[0]
        if top == "engine":
            if rel in engine_exceptions:
                used.add(rel)
                continue
            bad.append(f"{rel}:1: Python under engine/ (engine/ holds only the engine: C/CUDA, "
                       "its build, its C tests; development scripts go to tools/)")
            continue
        if top not in MAY_IMPORT:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        seen = set()
        for line, module, how in _imports(tree, root):
            if (line, module) in seen:  # import_module("x"): the call and its string
                continue
            seen.add((line, module))
            target = module.split(".")[0]
            if target not in PACKAGES or target in MAY_IMPORT[top]:
                continue
            if (rel, module) in exceptions:
                used.add((rel, module))
                continue
            allowed = ", ".join(sorted(MAY_IMPORT[top]))
            bad.append(f"{rel}:{line}: {top} -> {target} ({how} of {module}; {top} may import "
                       f"only {allowed})")
    return bad, used


# ---- C: engine/src's layers ---------------------------------------------------------------------

# Lower numbers are lower layers: a file may include the headers listed for it and call the
# functions of files on its own layer or below (docs/architecture.md).
C_LAYER = {
    "gemm.c": 1,      # the GEMM
    "kernels.c": 2,   # every op's maths, on the GEMM
    "llama_ops.c": 2,  # the Llama family's own ops (RMSNorm, RoPE, SwiGLU, GQA attention)
    "optim.c": 3,     # AdamW over the model's flat buffers
    "safetensors.c": 3,  # safetensors weights: the header's JSON, load, the writer
    "checkpoint.c": 3,  # training checkpoints (safetensors files with AdamW's state)
    "shards.c": 3,    # token shards
    "cuda_stub.c": 3,  # the CUDA backend's table in a CPU-only build
    "model.c": 4,     # stages, parameter table, passes
    "llama_model.c": 4,  # the Llama family's table, buffers and passes (model.c hands over)
    "ops_abi.c": 5,   # the op-level ABI (parity of single kernels)
    "api.c": 5,       # the ABI: handles, setters, errors
    "api_params.c": 5,  # the ABI's parameter table and files (weights, checkpoints)
    "api_passes.c": 5,  # the ABI's passes and optimizer step
}
C_INCLUDES = {  # the local headers each file may include
    "internal.h": {"tandem.h"},
    "gemm.h": {"internal.h"},             # the GEMM's entry points
    "kernels.h": {"internal.h", "gemm.h"},  # the ops, on the GEMM
    "gemm.c": {"gemm.h"},                 # the GEMM sees nothing of the ops
    "kernels.c": {"kernels.h"},
    "llama_ops.h": {"internal.h"},        # the Llama ops (their GEMMs are td_gemm's)
    "llama_ops.c": {"llama_ops.h", "kernels.h"},  # GQA attention on kernels.c's per-head GEMMs
    "optim.c": {"internal.h"},
    "safetensors.h": {"internal.h"},      # what safetensors.c shares with checkpoint.c
    "safetensors.c": {"internal.h", "safetensors.h"},
    "checkpoint.c": {"internal.h", "safetensors.h"},
    "shards.c": {"internal.h"},
    "cuda_stub.c": {"internal.h"},
    "model.c": {"internal.h", "kernels.h", "llama_ops.h"},
    "llama_model.c": {"internal.h", "kernels.h", "llama_ops.h"},
    "ops_abi.c": {"internal.h", "kernels.h", "llama_ops.h"},
    "api.c": {"internal.h", "kernels.h"},
    "api.h": {"internal.h"},              # what the ABI's files share (REQUIRE_BUILT)
    "api_params.c": {"internal.h", "api.h"},
    "api_passes.c": {"internal.h", "api.h"},
}
# functions every layer may call, with the file that defines them and why they live there
C_BASE = {
    "td_fail": ("api.c", "the error helpers sit in api.c beside the thread-local error buffer; "
                "they belong below every layer (a file of their own is a code move)"),
    "td_fail_global": ("api.c", "as td_fail"),
}
# (caller, callee file) -> (the functions it may call there, why)
C_EXCEPTIONS = {
    ("gemm.c", "kernels.c"): (
        {"td_gemm_reference"},
        "the plain reference GEMM is defined in kernels.c beside the other reference kernels; the "
        "fast GEMM falls back to it for the float64 build and tiny shapes (a cycle gemm.c <-> "
        "kernels.c until the reference moves into gemm.c)"),
    ("safetensors.c", "model.c"): (
        {"td_find_param", "td_full_model_has"},
        "the parameter table's lookups live in model.c; safetensors loading needs them (the "
        "file layer reaches up into the model until the table gets a file of its own)"),
}
C_PUBLIC = {"tandem.h"}  # engine/include: the only header outside engine/src a source may name
RUNTIME_FORBIDDEN = {"internal.h", "kernels.h"}  # the runtime speaks the public ABI only


def _strip_c(text: str) -> str:
    """Comments and string / character literals blanked, line structure kept."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, text,
                  flags=re.S)


_DEF = re.compile(r"^(?!static\b)[A-Za-z_][\w \t*]*?\b(td_\w+)\s*\(([^;{}]*)\)\s*\{", re.M)
_CALL = re.compile(r"\b(td_\w+)\s*\(")


def c_graph(src: Path):
    """({file: [(line, header)]}, {function: defining file}, {file: [(line, function)]})."""
    files = sorted(p for p in src.iterdir() if p.suffix in (".c", ".h"))
    includes, defs, calls = {}, {}, {}
    for p in files:
        raw = p.read_text(encoding="utf-8")
        includes[p.name] = [(i + 1, m.group(1)) for i, line in enumerate(raw.splitlines())
                            if (m := re.match(r'\s*#\s*include\s+"([^"]+)"', line))]
        text = _strip_c(raw)
        spans = []
        for m in _DEF.finditer(text):
            if p.suffix == ".c":
                defs.setdefault(m.group(1), p.name)
            spans.append(m.start(1))
        calls[p.name] = [(text.count("\n", 0, m.start()) + 1, m.group(1))
                         for m in _CALL.finditer(text) if m.start(1) not in spans]
    return includes, defs, calls


def c_violations(root: Path, layer=C_LAYER, may_include=C_INCLUDES, base=C_BASE,
                 exceptions=C_EXCEPTIONS) -> tuple[list[str], set]:
    src = root / "engine" / "src"
    includes, defs, calls = c_graph(src)
    bad, used = [], set()
    for name, incs in includes.items():
        rel = f"engine/src/{name}"
        if name not in may_include or (name.endswith(".c") and name not in layer):
            bad.append(f"{rel}:1: not in the declared layering (add it to C_LAYER / C_INCLUDES "
                       "in tests/test_layering.py and to docs/architecture.md)")
            continue
        for line, h in incs:
            if h.endswith(".c"):
                bad.append(f"{rel}:{line}: includes a source file ({h})")
            elif h not in may_include[name]:
                bad.append(f"{rel}:{line}: {name} -> {h} (may include only "
                           f"{', '.join(sorted(may_include[name]))})")
    for name, cs in calls.items():
        if name not in layer:
            continue
        for line, fn in cs:
            callee = defs.get(fn)
            if callee is None or callee == name or layer.get(callee, 0) <= layer[name]:
                continue
            if fn in base and base[fn][0] == callee:
                continue
            allowed = exceptions.get((name, callee))
            if allowed and fn in allowed[0]:
                used.add((name, callee))
                continue
            bad.append(f"engine/src/{name}:{line}: {name} -> {callee} (calls {fn}, a layer above: "
                       f"{name} is layer {layer[name]}, {callee} layer {layer[callee]})")
    for p in sorted((root / "engine" / "runtime").glob("*")):
        if p.suffix not in (".c", ".h", ".cu"):
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
            if m and m.group(1) in RUNTIME_FORBIDDEN:
                bad.append(f"engine/runtime/{p.name}:{i + 1}: runtime -> {m.group(1)} (the "
                           "runtime drives libtandem through tandem.h only)")
    return bad, used


# ---- the checks on this repository --------------------------------------------------------------


def test_python_imports_follow_the_layering():
    bad, used = python_violations(REPO)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
    stale = (set(PY_EXCEPTIONS) | set(ENGINE_PY_EXCEPTIONS)) - used
    assert not stale, f"exceptions nothing needs any more (remove them): {sorted(stale)}"


def test_engine_src_includes_and_calls_follow_the_layering():
    bad, used = c_violations(REPO)
    assert not bad, "engine/src against its layering:\n" + "\n".join(bad)
    stale = set(C_EXCEPTIONS) - used
    assert not stale, f"exceptions nothing needs any more (remove them): {sorted(stale)}"


# ---- the checkers catch what they must ----------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_python_checker_catches_planted_violations(tmp_path):
    _write(tmp_path, {
        "reference/__init__.py": "",
        "reference/gpt2.py": "import numpy as np\nfrom harness.engine import Model\n",
        "harness/__init__.py": "",
        "harness/engine.py": "from reference import gpt2\n",
        "harness/cli.py": "import importlib\nmod = importlib.import_module('suites.asv')\n"
                          "TABLE = {'report': 'reports.cli'}\n",
        "harness/late.py": "def f():\n    import tools.gpu_bench\n",
        "reports/__init__.py": "", "reports/cli.py": "from harness import engine\n",
        "suites/asv/__init__.py": "from reports import cli\n",
        "tools/gpu_bench.py": "import harness.engine, reports.cli, suites.asv\n",
        "tests/test_x.py": "import tools.gpu_bench\n",
        "engine/cuda/bench.py": "print('no')\n",
    })
    bad, used = python_violations(tmp_path, exceptions={}, engine_exceptions={})
    found = {re.sub(r" \(.*", "", b) for b in bad}
    assert found == {
        "reference/gpt2.py:2: reference -> harness",
        "harness/cli.py:2: harness -> suites",
        "harness/cli.py:3: harness -> reports",
        "harness/late.py:2: harness -> tools",
        "suites/asv/__init__.py:1: suites -> reports",
        "engine/cuda/bench.py:1: Python under engine/",
    }, bad
    # a declared exception silences exactly its own arrow, and is reported as used
    bad, used = python_violations(tmp_path, exceptions={("harness/cli.py", "reports.cli"): "why"},
                                  engine_exceptions={})
    assert used == {("harness/cli.py", "reports.cli")}
    assert not any("harness/cli.py:3" in b for b in bad)
    assert any("harness/cli.py:2" in b for b in bad)


_C_TREE = {
    "engine/include/tandem.h": "",
    "engine/src/internal.h": '#include "tandem.h"\nint td_fail(void);\n',
    "engine/src/kernels.h": '#include "internal.h"\n',
    "engine/src/gemm.c": '#include "kernels.h"\nvoid td_gemm(void) { td_gemm_reference(); }\n',
    "engine/src/kernels.c": '#include "kernels.h"\nvoid td_gemm_reference(void) {}\n'
                            'void td_linear_forward(void) { td_gemm(); }\n',
    "engine/src/model.c": '#include "internal.h"\n#include "kernels.h"\n'
                          'int td_find_param(void) { return td_fail(); }\n'
                          'int td_forward_slot(void) { td_linear_forward(); return 0; }\n',
    "engine/src/safetensors.c": '#include "internal.h"\nint td_load(void) {\n'
                       '    /* td_forward_slot() in a comment is no call */\n'
                       '    return td_find_param() + td_fail();\n}\n',
    "engine/src/optim.c": '#include "internal.h"\nvoid td_adamw(void) {}\n',
    "engine/src/api.c": '#include "internal.h"\n#include "kernels.h"\n'
                        'int td_fail(void) { return 1; }\n'
                        'int td_model_step(void) {\n'
                        '    td_adamw();\n    return td_forward_slot() + td_load();\n}\n',
    "engine/runtime/runtime.c": '#include "runtime.h"\n',
}
_C_LAYER = {"gemm.c": 1, "kernels.c": 2, "optim.c": 3, "safetensors.c": 3, "model.c": 4, "api.c": 5}
_C_INCLUDES = {"internal.h": {"tandem.h"}, "kernels.h": {"internal.h"}, "gemm.c": {"kernels.h"},
               "kernels.c": {"kernels.h"}, "optim.c": {"internal.h"},
               "safetensors.c": {"internal.h"},
               "model.c": {"internal.h", "kernels.h"}, "api.c": {"internal.h", "kernels.h"}}
_C_BASE = {"td_fail": ("api.c", "base")}
_C_EXC = {("gemm.c", "kernels.c"): ({"td_gemm_reference"}, "cycle"),
          ("safetensors.c", "model.c"): ({"td_find_param"}, "table")}


def _c_check(tmp_path, extra: dict[str, str]):
    _write(tmp_path, {**_C_TREE, **extra})
    return c_violations(tmp_path, _C_LAYER, _C_INCLUDES, _C_BASE, _C_EXC)


def test_c_checker_passes_a_clean_tree(tmp_path):
    bad, used = _c_check(tmp_path, {})
    assert bad == [] and used == set(_C_EXC)


@pytest.mark.parametrize("extra, expect", [
    ({"engine/src/optim.c": '#include "internal.h"\n#include "kernels.h"\n'
                            'void td_adamw(void) {}\n'},
     "engine/src/optim.c:2: optim.c -> kernels.h"),
    ({"engine/src/safetensors.c": '#include "internal.h"\n'
                         'int td_load(void) { return td_forward_slot(); }\n'},
     "engine/src/safetensors.c:2: safetensors.c -> model.c (calls td_forward_slot"),
    ({"engine/src/optim.c": '#include "internal.h"\nvoid td_adamw(void) { td_find_param(); }\n'},
     "engine/src/optim.c:2: optim.c -> model.c"),
    ({"engine/src/kernels.c": '#include "kernels.h"\n#include "gemm_pack.h"\n'
                              'void td_gemm_reference(void) {}\n'},
     "engine/src/kernels.c:2: kernels.c -> gemm_pack.h"),
    ({"engine/src/ckpt.c": '#include "internal.h"\n'}, "engine/src/ckpt.c:1: not in the declared"),
    ({"engine/src/safetensors.c": '#include "internal.h"\n#include "model.c"\n'},
     "engine/src/safetensors.c:2: includes a source file"),
    ({"engine/runtime/runtime.c": '#include "runtime.h"\n#include "internal.h"\n'},
     "engine/runtime/runtime.c:2: runtime -> internal.h"),
])
def test_c_checker_catches_planted_violations(tmp_path, extra, expect):
    bad, _ = _c_check(tmp_path, extra)
    assert any(b.startswith(expect) for b in bad), bad
