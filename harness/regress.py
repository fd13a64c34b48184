"""`tandem regress BASE HEAD`: benchmark two commits with asv and fail on a gated slowdown.

Each commit is checked out in a temporary git worktree and installed with pip into a directory
of its own (`--target`, no virtualenv, no dependencies: the ones already installed are used,
so it works offline). asv then runs the benchmarks of this checkout (asv.conf.json,
suites/asv) once per commit with `-E existing:same --set-commit-hash SHA`, importing that
commit's install through ASV_PYTHONPATH; so both sides are measured by the same benchmark code.
The asv comparison table is printed, then the gate: exit 1 when a gated metric got worse by more
than its factor (GATES below; docs/asv.md says why these values), 0 otherwise, 2 on bad input.
Not here: the benchmarks themselves (suites/asv), history and HTML (`asv publish`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError, TandemError

MACHINE = "tandem-regress"  # the asv machine name the gate records its results under
QUICK_ENV = "TANDEM_ASV_QUICK"  # fewer inner repeats; suites/asv quick() reads the name here
# Paths whose content decides what gets built and imported: two commits that agree on all of
# them share one install (a docs-only commit is not rebuilt).
BUILD_INPUTS = ("engine", "harness", "reference", "reports", "suites", "CMakeLists.txt",
                "pyproject.toml")


class GateError(TandemError):
    """The gate could not measure (install or asv failed): not a verdict on the commits."""

    exit_code = 3


@dataclass(frozen=True)
class Gate:
    """Benchmarks whose asv name matches `pattern` fail the gate when HEAD/BASE > factor."""

    pattern: str
    factor: float
    why: str


# First match wins. Metrics are lower-is-better, so HEAD/BASE > factor means slower.
GATES = (
    Gate(r"^bench_ratio\.EngineOverJax\.", 1.5,
         "engine/JAX ratio, one pinned CPU, alternating steps: load cancels (pairs within 14%)"),
    Gate(r"^bench_instr\.", 1.25,
         "callgrind instruction count: deterministic; the margin is for deliberate trade-offs"),
    Gate(r"^bench_engine\.EngineStep\.", 2.5,
         "raw in-process times (best step): identical builds drifted up to 2.2x between runs"),
    Gate(r"^bench_jax\.", 2.5, "raw JAX times (best step): as above"),
    Gate(r"^bench_(engine\.PipelineStep|ratio\.PipelineOverJax)\.", 4.0,
         "pipelined (mpirun) times and ratios: identical builds moved up to 3.5x; breakage only"),
)


def gate_for(name: str, override: float | None = None) -> Gate | None:
    """The gate of asv benchmark `name` ("bench_ratio.EngineOverJax.track_time_ratio"), with
    its factor replaced by `override` when given; None for an ungated benchmark."""
    for g in GATES:
        if re.search(g.pattern, name):
            return Gate(g.pattern, override, g.why) if override else g
    return None


# ---- git and installs --------------------------------------------------------------------------


def _git(repo: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise GateError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def repo_root(path: str | os.PathLike) -> Path:
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"--repo {path}: not inside a git repository "
                          f"({proc.stderr.strip() or 'git failed'})")
    return Path(proc.stdout.strip())


def resolve_commit(repo: Path, rev: str) -> str:
    """The full SHA of `rev`; ConfigError (exit 2) naming it when the repository lacks it."""
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet",
                           f"{rev}^{{commit}}"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ConfigError(f"unknown commit {rev!r} in {repo} (git rev-parse found no such "
                          "commit). HINT: fetch it, or pass a SHA, tag or branch that exists")
    return proc.stdout.strip()


def build_key(repo: Path, sha: str) -> str:
    """A digest of the trees of BUILD_INPUTS at `sha`: equal keys, equal installs."""
    parts = [f"{p}={_git(repo, 'rev-parse', '--verify', '--quiet', f'{sha}:{p}', check=False)}"
             for p in BUILD_INPUTS]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _offline_build_ok() -> bool:
    """Can pip build this project without fetching build requirements from the index?"""
    have = importlib.util.find_spec
    return bool(have("scikit_build_core")) and bool(shutil.which("cmake") or have("cmake"))


def install_commit(repo: Path, sha: str, work: Path, log=print) -> Path:
    """Install commit `sha` into work/installs/<build key> (reused if already there) and
    return that directory, to be put on PYTHONPATH. The worktree is removed afterwards."""
    key = build_key(repo, sha)
    target = work / "installs" / key
    if (target / ".complete").exists():
        log(f"regress: {sha[:12]}: reusing the install in {target}")
        return target
    if target.exists():
        shutil.rmtree(target)
    wt = work / f"wt-{sha[:12]}"
    if wt.exists():
        _git(repo, "worktree", "remove", "--force", str(wt), check=False)
        shutil.rmtree(wt, ignore_errors=True)
    _git(repo, "worktree", "add", "--detach", "--quiet", str(wt), sha)
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet",
               "--target", str(target)]
        if _offline_build_ok():
            cmd.append("--no-build-isolation")  # build with what is installed: works offline
        cmd.append(str(wt))
        log(f"regress: {sha[:12]}: building and installing into {target}")
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise GateError(f"installing {sha[:12]} failed (pip exit {proc.returncode}):\n{tail}"
                            "\nHINT: offline builds need scikit-build-core, cmake and ninja "
                            "installed (`pip install scikit-build-core cmake ninja`)")
    finally:
        _git(repo, "worktree", "remove", "--force", str(wt), check=False)
        shutil.rmtree(wt, ignore_errors=True)
        _git(repo, "worktree", "prune", check=False)
    (target / ".complete").write_text(sha + "\n")
    return target


# ---- asv ---------------------------------------------------------------------------------------


def _load_jsonc(path: Path) -> dict:
    """asv.conf.json allows // comments (asv reads it with js_comments=True)."""
    from asv import util as asv_util

    return asv_util.load_json(str(path), js_comments=True)


def write_conf(repo: Path, results: Path, work: Path, tag: str) -> Path:
    """An asv config for the gate: this checkout's asv.conf.json with absolute paths, the
    results in `results`, and environments only of the `existing` kind."""
    src = repo / "asv.conf.json"
    if not src.is_file():
        raise ConfigError(f"{src}: no asv configuration in this checkout; `tandem regress` runs "
                          "its benchmarks (benchmark_dir) against both commits")
    conf = _load_jsonc(src)
    bench_dir = (repo / conf.get("benchmark_dir", "benchmarks")).resolve()
    if not bench_dir.is_dir():
        raise ConfigError(f"{src}: benchmark_dir = {str(bench_dir)!r} does not exist")
    conf.update(repo=str(repo), benchmark_dir=str(bench_dir), results_dir=str(results),
                html_dir=str(work / "html"), env_dir=str(work / "env"),
                environment_type="existing")
    conf.pop("matrix", None)
    path = work / f"asv-{tag}.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


def _asv(args: list[str], conf: Path, env: dict | None = None, capture: bool = False,
         ok_codes: tuple[int, ...] = (0,)):
    cmd = [sys.executable, "-m", "asv", *args, "--config", str(conf)]
    proc = subprocess.run(cmd, env=env, cwd=conf.parent, stdin=subprocess.DEVNULL,
                          capture_output=capture, text=True)
    if proc.returncode not in ok_codes:
        out = (proc.stdout or "") + (proc.stderr or "") if capture else ""
        raise GateError(f"asv {args[0]} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                        f"{out[-3000:]}")
    return proc


def run_benchmarks(conf: Path, sha: str, install: Path, bench_regex: str | None, quick: bool,
                   extra_env: dict[str, str]) -> None:
    """asv run of this checkout's benchmarks against the commit installed in `install`."""
    env = dict(os.environ)
    env.update(extra_env)
    # The commit's install, and nothing else, ahead of site-packages: `existing` environments
    # pass PYTHONPATH through to the benchmarks as is, virtualenv ones take ASV_PYTHONPATH.
    env["PYTHONPATH"] = env["ASV_PYTHONPATH"] = str(install)
    env.pop(QUICK_ENV, None)
    if quick:
        env[QUICK_ENV] = "1"
    args = ["run", "-E", "existing:same", "--set-commit-hash", sha, "--machine", MACHINE,
            "--show-stderr"]
    if quick:
        args.append("--quick")
    if bench_regex:
        args += ["--bench", bench_regex]
    sys.stdout.flush()
    # exit 2: some benchmark failed; its result is stored as failed and the gate judges it
    _asv(args, conf, env, ok_codes=(0, 2))


def load_values(conf_path: Path, sha: str) -> dict[str, tuple[float | None, str | None]]:
    """{"name(params)": (value, unit)} of one commit's results under the config `conf_path`;
    value None = failed, NaN = skipped. Names are those `asv compare` prints."""
    from asv.benchmarks import Benchmarks
    from asv.commands.compare import unroll_result
    from asv.config import Config
    from asv.results import iter_results_for_machine_and_hash

    conf = Config.load(str(conf_path))
    try:
        units = {k: v.get("unit") for k, v in Benchmarks.load(conf).items()}
    except Exception:  # noqa: BLE001 - no benchmarks.json: units unknown
        units = {}
    out: dict[str, tuple[float | None, str | None]] = {}
    try:
        for res in iter_results_for_machine_and_hash(conf.results_dir, MACHINE, sha):
            for key in res.get_all_result_keys():
                params = res.get_result_params(key)
                for name, v in unroll_result(key, params, res.get_result_value(key, params)):
                    out[name] = (v, units.get(key))
    except Exception as exc:  # noqa: BLE001 - asv raises UserError when nothing is there
        raise GateError(f"no asv results for {sha[:12]} in {conf.results_dir}: {exc}") from None
    if not out:
        raise GateError(f"no asv results for {sha[:12]} in {conf.results_dir} (did every "
                        "benchmark fail to import? run with --work-dir and read asv's output)")
    return out


# ---- the verdict -------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    unit: str | None
    base: float | None
    head: float | None
    gate: Gate | None

    @property
    def ratio(self) -> float | None:
        ok = all(v is not None and not math.isnan(v) for v in (self.base, self.head))
        return self.head / self.base if ok and self.base > 0 else None

    @property
    def verdict(self) -> str:
        if self.gate is None:
            return "not gated"
        if self.base is None or (isinstance(self.base, float) and math.isnan(self.base)):
            return "no base value"
        if self.head is None:
            return "FAILED in HEAD"
        if math.isnan(self.head):
            return "skipped in HEAD"
        r = self.ratio
        if r is None:
            return "n/a"
        return "WORSE" if r > self.gate.factor else "ok"

    @property
    def fails(self) -> bool:
        return self.verdict in ("WORSE", "FAILED in HEAD")


def compare(base: dict, head: dict, override: float | None = None) -> list[Row]:
    names = sorted(set(base) | set(head))
    return [Row(n, (base.get(n) or head.get(n) or (None, None))[1],
                base.get(n, (math.nan, None))[0], head.get(n, (math.nan, None))[0],
                gate_for(n.split("(")[0], override)) for n in names]


def _fmt(v: float | None) -> str:
    if v is None:
        return "failed"
    if math.isnan(v):
        return "n/a"
    return f"{v:.4g}"


def format_gate(rows: list[Row], base: str, head: str) -> str:
    head_line = (f"{'verdict':<16} {'HEAD/BASE':>9} {'gate':>6} {'BASE':>10} {'HEAD':>10}  "
                 f"{'unit':<14} benchmark")
    lines = [f"Regression gate: BASE {base[:12]}  HEAD {head[:12]}", head_line,
             "-" * len(head_line)]
    for r in rows:
        gate = f"x{r.gate.factor:g}" if r.gate else "-"
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "n/a"
        lines.append(f"{r.verdict:<16} {ratio:>9} {gate:>6} {_fmt(r.base):>10} "
                     f"{_fmt(r.head):>10}  {r.unit or '':<14} {r.name}")
    return "\n".join(lines)


def _exact_regex(names: list[str]) -> str:
    """An asv --bench regex selecting exactly these results: asv matches a parameterized
    benchmark as "name(param, ...)", the form these names already have."""
    return "^(" + "|".join(re.escape(n) for n in sorted(set(names))) + ")$"


# ---- the command -------------------------------------------------------------------------------


def add_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("gates (first match; HEAD/BASE above the factor fails):\n" + "\n".join(
        f"  x{g.factor:<5g} {g.pattern}\n         {g.why}" for g in GATES) +
        "\n\nexit codes: 0 no gated regression, 1 a gated metric worsened (named in the "
        "output),\n2 bad input (unknown commit, no asv), 3 the gate could not measure. "
        "docs/asv.md has the details.")
    p.add_argument("base", metavar="BASE", help="the reference commit (SHA, tag, branch, HEAD~1)")
    p.add_argument("head", metavar="HEAD", help="the commit under test")
    p.add_argument("--factor", type=float, default=None, metavar="F",
                   help="one factor for every gated metric instead of the per-metric defaults")
    p.add_argument("--bench-regex", default=None, metavar="R",
                   help="only benchmarks whose asv name matches R (asv run --bench)")
    p.add_argument("--quick", action="store_true",
                   help="asv --quick and fewer inner repeats (TANDEM_ASV_QUICK=1): faster, noisier")
    p.add_argument("--confirm", type=int, default=1, metavar="N",
                   help="re-measure both commits up to N more times for the metrics that failed; "
                        "a metric fails only if it fails every round (default 1)")
    p.add_argument("--repo", default=".", help="the git checkout (default: the current directory)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="keep worktrees, installs and asv results here (reused between calls); "
                        "default: a temporary directory, removed at the end")
    p.add_argument("--head-env", action="append", default=[], metavar="VAR=VALUE",
                   help="environment for the HEAD side only, e.g. TANDEM_SLOWDOWN=2 to plant a "
                        "slowdown when testing the gate (repeatable)")


def _parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise ConfigError(f"--head-env {item!r}: expected VAR=VALUE")
        out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    if args.factor is not None and not (math.isfinite(args.factor) and args.factor > 1.0):
        raise ConfigError(f"--factor = {args.factor!r}: must be a number > 1")
    if args.confirm < 0:
        raise ConfigError(f"--confirm = {args.confirm}: must be >= 0")
    if args.bench_regex is not None:
        try:
            re.compile(args.bench_regex)
        except re.error as exc:
            raise ConfigError(f"--bench-regex {args.bench_regex!r}: {exc}") from None
    head_env = _parse_env(args.head_env)
    if importlib.util.find_spec("asv") is None:
        raise ConfigError("asv is not installed. HINT: pip install 'asv>=0.6' (or '.[test]')")
    repo = repo_root(args.repo)
    base, head = resolve_commit(repo, args.base), resolve_commit(repo, args.head)
    work = Path(args.work_dir).resolve() if args.work_dir else Path(
        tempfile.mkdtemp(prefix="tandem-regress-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _gate(repo, base, head, work, args, head_env)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _measure(repo: Path, work: Path, tag: str, base: str, head: str, installs: dict,
             args, head_env: dict, bench_regex: str | None) -> tuple[dict, dict, Path, Path]:
    """One round: asv run of BASE, then HEAD. Distinct commits share one results directory
    (so `asv compare` can read both); the same commit twice needs two."""
    same = base == head
    res_base = work / "results" / (f"{tag}-base" if same else tag)
    res_head = work / "results" / (f"{tag}-head" if same else tag)
    for d in {res_base, res_head}:
        shutil.rmtree(d, ignore_errors=True)
    conf_base = write_conf(repo, res_base, work, f"{tag}-base")
    conf_head = write_conf(repo, res_head, work, f"{tag}-head")
    _asv(["machine", "--machine", MACHINE, "--yes"], conf_base, capture=True)
    for side, sha, conf, env in (("BASE", base, conf_base, {}), ("HEAD", head, conf_head,
                                                                   head_env)):
        extra = f" with {' '.join(f'{k}={v}' for k, v in env.items())}" if env else ""
        print(f"regress: {tag}: asv run for {side} {sha[:12]}{extra}", flush=True)
        run_benchmarks(conf, sha, installs[sha], bench_regex, args.quick, env)
    return load_values(conf_base, base), load_values(conf_head, head), conf_base, conf_head


def _print_asv_table(conf_base: Path, conf_head: Path, base: str, head: str,
                     factor: float) -> None:
    """asv's comparison table: the CLI when both commits share a results directory, else
    asv's own table printer over the two result sets."""
    print(f"\nasv compare {base[:12]} {head[:12]} (factor {factor:g} marks a change):", flush=True)
    if base != head:  # one results directory holds both
        proc = _asv(["compare", "--split", "--factor", str(factor), "--machine", MACHINE,
                     base, head], conf_base, capture=True)
        print(proc.stdout, flush=True)
        return
    try:
        from asv.commands.compare import Compare
        from asv.config import Config
        from asv.results import iter_results_for_machine_and_hash

        def resultset(conf_path: Path, sha: str):
            conf = Config.load(str(conf_path))
            for r in iter_results_for_machine_and_hash(conf.results_dir, MACHINE, sha):
                for key in r.get_all_result_keys():
                    params = r.get_result_params(key)
                    yield (key, params, r.get_result_value(key, params),
                           r.get_result_stats(key, params), r.get_result_samples(key, params),
                           r.benchmark_version.get(key), r.params["machine"], r.env_name)

        Compare.print_table(Config.load(str(conf_head)), base, head, factor=factor, split=True,
                            resultset_1=resultset(conf_base, base),
                            resultset_2=resultset(conf_head, head), machine=MACHINE,
                            commit_names={base: "BASE", head: "HEAD"})
        sys.stdout.flush()
    except Exception as exc:  # noqa: BLE001 - an asv without this API: the gate table follows
        print(f"(asv's table is unavailable for one commit against itself: {exc})")


def _gate(repo: Path, base: str, head: str, work: Path, args, head_env: dict) -> int:
    installs = {sha: install_commit(repo, sha, work) for sha in dict.fromkeys((base, head))}
    b, h, conf_b, conf_h = _measure(repo, work, "round0", base, head, installs, args, head_env,
                                    args.bench_regex)
    rows = compare(b, h, args.factor)
    if all(r.base is None and r.head is None for r in rows):
        raise GateError("every benchmark failed on both commits (asv's output above says why): "
                        "nothing was measured")
    smallest = min((g.factor for g in GATES), default=1.5) if args.factor is None else args.factor
    _print_asv_table(conf_b, conf_h, base, head, smallest)
    print("\n" + format_gate(rows, base, head), flush=True)

    failing = [r for r in rows if r.fails]
    for k in range(1, args.confirm + 1):
        if not failing:
            break
        names = [r.name for r in failing]
        print(f"\nregress: confirming {len(names)} failing metric(s), round {k} of "
              f"{args.confirm}: {', '.join(names)}", flush=True)
        b2, h2, _, _ = _measure(repo, work, f"round{k}", base, head, installs, args, head_env,
                                _exact_regex(names))
        again = {r.name: r for r in compare(b2, h2, args.factor)}
        print(format_gate([again[n] for n in names if n in again], base, head), flush=True)
        # a real slowdown fails every round; noise rarely does twice
        failing = [again[r.name] for r in failing if r.name in again and again[r.name].fails]

    if failing:
        print("\nregress: FAIL: gated metric(s) worse than allowed:")
        for r in failing:
            what = (f"HEAD/BASE = {r.ratio:.2f} > x{r.gate.factor:g}" if r.ratio is not None
                    else r.verdict)
            print(f"  {r.name} [{r.unit or ''}]: {what}")
        return 1
    gated = sum(1 for r in rows if r.verdict == "ok")
    print(f"\nregress: OK: {gated} gated metric(s) within their factors "
          f"(BASE {base[:12]}, HEAD {head[:12]})")
    return 0


__all__ = ["GATES", "Gate", "gate_for", "resolve_commit", "build_key", "install_commit",
           "compare", "format_gate", "add_parser", "run"]
