"""Mutation testing of `tandem parity`: plants one known bug at a time in a scratch copy of the
engine, rebuilds it, runs a parity suite against it and reports which bugs the suite kills.

The bugs live in tools/mutants.toml (name, file, an exact `find` string that must occur exactly
once in that file, its `replace`, and what the bug models). A stale mutant (its find string
missing or ambiguous) is an error, never a skip. Not here: the parity checks themselves
(harness/parity.py) or the suites (suites/*.toml); nothing in the repository's engine/ is edited.

  python tools/mutate.py [--suite smoke] [--only NAME...] [--list] [--jobs 1] [--out DIR]

Per mutant: killed (parity exit 1: a comparison failed), crash (exit 3, any other exit, or a
timeout: killed too, shown apart), build-error (the mutated engine does not compile), survived
(exit 0). An unmutated control run must pass first, or the tool stops (exit 2). By default a
run stops at the first failing case (--full runs every case). Writes kill_table.json and
kill_table.md under --out; exit 0 when every mutant is killed, 1 when one survives, 2 on bad
input or a failing control.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTANTS = Path(__file__).resolve().parent / "mutants.toml"
MUTANT_KEYS = {"name", "file", "find", "replace", "models"}
# what the build needs: the engine's sources, with the top-level CMakeLists' flags
BUILD_TARGETS = ("tandem", "tandem-engine")
SNAPSHOT = ("engine", "harness", "reference", "suites")  # copied into each scratch directory
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DTD_TESTS=OFF", "-DTD_CUDA=OFF")


class MutantError(Exception):
    """A mutant list that cannot be applied as written (the message says which and why)."""


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root, under engine/
    find: str
    replace: str
    models: str


@dataclass
class Outcome:
    name: str
    file: str
    models: str
    result: str  # control-pass | killed | crash | build-error | survived
    exit_code: int | None
    seconds: float
    build_s: float
    first_failure: str = ""
    detail: str = ""


# ---- the mutant list ---------------------------------------------------------------------------


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MutantError(f"{path}: cannot read the mutant list: {e}") from None
    rows = doc.get("mutant")
    if not isinstance(rows, list) or not rows:
        raise MutantError(f"{path}: no [[mutant]] tables")
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{path}: mutant #{i + 1} ({row.get('name', '?')!r})"
        missing, unknown = MUTANT_KEYS - set(row), set(row) - MUTANT_KEYS
        if missing or unknown:
            raise MutantError(f"{where}: missing keys {sorted(missing)}, unknown keys "
                              f"{sorted(unknown)} (each mutant has {sorted(MUTANT_KEYS)})")
        if not all(isinstance(row[k], str) and (row[k] or k == "replace") for k in MUTANT_KEYS):
            raise MutantError(f"{where}: every key must be a non-empty string (replace may be "
                              "empty)")
        if row["find"] == row["replace"]:
            raise MutantError(f"{where}: replace equals find (the mutant changes nothing)")
        if row["name"] in seen:
            raise MutantError(f"{where}: duplicate name {row['name']!r}")
        if not row["file"].startswith("engine/") or ".." in Path(row["file"]).parts:
            raise MutantError(f"{where}: file {row['file']!r} must be a path under engine/")
        seen.add(row["name"])
        out.append(Mutant(**{k: row[k] for k in MUTANT_KEYS}))
    return out


def apply(text: str, m: Mutant) -> str:
    """The mutated source; MutantError unless `find` occurs exactly once (a stale mutant)."""
    n = text.count(m.find)
    if n != 1:
        how = "not found" if n == 0 else f"found {n} times"
        raise MutantError(f"mutant {m.name!r}: find string {how} in {m.file} (it must occur "
                          f"exactly once): {m.find[:80]!r}. HINT: the source changed; update "
                          "the mutant's find (and replace) in tools/mutants.toml")
    return text.replace(m.find, m.replace)


def check_all(mutants: list[Mutant], root: Path = REPO) -> None:
    """Every mutant applies to the sources under `root`; raises naming every stale one."""
    errors = []
    for m in mutants:
        src = root / m.file
        if not src.is_file():
            errors.append(f"mutant {m.name!r}: {m.file} does not exist")
            continue
        try:
            apply(src.read_text(encoding="utf-8"), m)
        except MutantError as e:
            errors.append(str(e))
    if errors:
        raise MutantError("\n".join(errors))


# ---- one scratch engine: copy, build, mutate, run ----------------------------------------------


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p)], capture_output=True,
                                  text=True).stdout.split()
        except OSError:
            kids = []
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """The parity run and everything it started (mpirun runs ranks in a session of its own)."""
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


QUIET_S = 2.0  # seconds of silence after a failing case line: its table is complete
_CASE = re.compile(r"^\[\d+/\d+\] (\S+)\s+(PASS|FAIL|ERROR)\b")
_ROW = re.compile(r"^  (\S+)\s{2,}(.+?)\s+\S+\s+\S+\s+\S+%\s+FAIL$")
_NOTE = re.compile(r"^  (\S+)\s{2,}ERROR: (.*)$")


class Scratch:
    """A private copy of engine/ with its own CMake build directory."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-mutate-", dir=base))
        # the harness and suites too: a run sees one snapshot even while the checkout moves on
        for sub in SNAPSHOT:
            shutil.copytree(root / sub, self.dir / sub,
                            ignore=shutil.ignore_patterns("build*", "__pycache__", "_lib"))
        self.build = self.dir / "build"
        self.originals: dict[str, str] = {}

    def cmake(self) -> tuple[bool, float, str]:
        t0 = time.perf_counter()
        cmds = []
        if not (self.build / "CMakeCache.txt").exists():
            cmds.append(["cmake", "-S", str(self.dir / "engine"), "-B", str(self.build),
                         *CMAKE_FLAGS])
        cmds.append(["cmake", "--build", str(self.build), "-j", "1", "--target", *BUILD_TARGETS])
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stdout + r.stderr).strip().splitlines()[-8:]
                return False, time.perf_counter() - t0, "\n".join(tail)
        return True, time.perf_counter() - t0, ""

    def _write(self, rel: str, text: str) -> None:
        path = self.dir / rel
        path.write_text(text, encoding="utf-8")
        # newer than any object built so far, whatever the file system's clock granularity
        t = time.time() + 2
        os.utime(path, (t, t))

    def mutate(self, m: Mutant) -> None:
        text = self.originals.setdefault(m.file, (self.dir / m.file).read_text(encoding="utf-8"))
        self._write(m.file, apply(text, m))

    def restore(self, m: Mutant) -> None:
        self._write(m.file, self.originals[m.file])

    def parity(self, suite: str, out: Path, timeout: float, full: bool
               ) -> tuple[int | None, float, str, str]:
        """(exit code, or None on a timeout; seconds; the first failure; the last lines of
        output). Stops at the first failing case unless `full`: the exit code is then the one
        the whole run would end with (3 when that case errored, else 1)."""
        env = dict(os.environ, TANDEM_LIB_DIR=str(self.build), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(self.dir)] +
                                              [p for p in [os.environ.get("PYTHONPATH")] if p]))
        cmd = [sys.executable, "-m", "harness.cli", "parity", "--suite", suite, "--out",
               str(out), "--worst", "0"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            _kill_tree(proc)

        timer = threading.Timer(timeout, expire)
        timer.start()
        lines: list[str] = []
        case, verdict, first, stopped = "", "", "", False
        q: queue.Queue = queue.Queue()

        def pump() -> None:
            for raw in proc.stdout:
                q.put(raw.rstrip("\n"))
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            while True:
                try:  # a failing case's table is printed at once: a pause means it is complete
                    line = q.get(timeout=QUIET_S if case and not full else None)
                except queue.Empty:
                    stopped = True
                    break
                if line is None:
                    break
                lines.append(line)
                c = _CASE.match(line)
                if case and not full and (c or line.startswith("parity: ")):
                    stopped = True
                    break
                if c and c.group(2) != "PASS" and not case:
                    case, verdict, first = c.group(1), c.group(2), f"{c.group(1)}: {c.group(2)}"
                    continue
                if case and not first.count(" / "):
                    r, e = _ROW.match(line), _NOTE.match(line)
                    if r:
                        first = f"{case} / {r.group(1)} / {r.group(2).strip()}"
                    elif e:
                        first = f"{case} / {e.group(1)} / {e.group(2)[:160]}"
                    elif line.startswith("  error: "):
                        first = f"{case} / {line[9:170]}"
        finally:
            timer.cancel()
            if stopped:
                _kill_tree(proc)
            rc = proc.wait()
        if stopped:
            rc = 3 if verdict == "ERROR" else 1
        elif timed_out.is_set():
            rc = None
        elif rc == 1 and not any(x.startswith("parity: FAIL") for x in lines):
            rc = -1  # exit 1 without parity's verdict (a traceback): a crash, not a kill
        return rc, time.perf_counter() - t0, first, "\n".join(lines[-12:])

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def classify(rc: int | None) -> str:
    if rc == 0:
        return "survived"
    if rc == 1:
        return "killed"
    return "crash"  # 3 (engine or rank failure), another code, or a timeout (None)


def run_one(scratch: Scratch, m: Mutant | None, suite: str, out: Path, timeout: float,
            full: bool) -> Outcome:
    name = m.name if m else "control"
    t0 = time.perf_counter()
    try:
        if m:
            scratch.mutate(m)
        ok, build_s, log = scratch.cmake()
        if not ok:
            return Outcome(name, m.file if m else "", m.models if m else "", "build-error",
                           None, time.perf_counter() - t0, build_s, "", log)
        rc, _, first, tail = scratch.parity(suite, out / "runs" / name, timeout, full)
    finally:
        if m:
            scratch.restore(m)
    if m is None:
        result = "control-pass" if rc == 0 else "control-fail"
    else:
        result = classify(rc)
    if rc is None:
        first = first or f"timed out after {timeout:.0f} s"
    return Outcome(name, m.file if m else "", m.models if m else "", result, rc,
                   time.perf_counter() - t0, build_s, first, "" if rc in (0, 1) else tail)


# ---- the table ---------------------------------------------------------------------------------


def summary(outcomes: list[Outcome]) -> dict:
    n = len(outcomes)
    counts = {k: sum(o.result == k for o in outcomes)
              for k in ("killed", "crash", "build-error", "survived")}
    dead = counts["killed"] + counts["crash"]
    return {"mutants": n, **counts, "kill_rate": dead / n if n else 0.0,
            "survivors": [o.name for o in outcomes if o.result == "survived"],
            "seconds": round(sum(o.seconds for o in outcomes), 1)}


def markdown(outcomes: list[Outcome], control: Outcome, suite: str, wall: float) -> str:
    s = summary(outcomes)
    lines = [f"# Mutation testing: `tandem parity --suite {suite}`", "",
             f"{s['mutants']} mutants: {s['killed']} killed by a failed comparison, "
             f"{s['crash']} by a crash or timeout, {s['build-error']} did not build, "
             f"{s['survived']} survived. Kill rate {100 * s['kill_rate']:.1f}%. Control "
             f"(unmutated) run {control.seconds:.1f} s; wall {wall:.0f} s.", "",
             "| mutant | file | result | first failure (case / tier / tensor) | s |",
             "|---|---|---|---|---|"]
    for o in outcomes:
        ff = o.first_failure.replace("|", "\\|")
        lines.append(f"| {o.name} | {o.file.removeprefix('engine/')} | {o.result} | {ff} | "
                     f"{o.seconds:.0f} |")
    return "\n".join(lines) + "\n"


# ---- the command -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/mutate.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="smoke", help="parity suite to run (default smoke)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--jobs", type=int, default=1, help="scratch engines run side by side")
    ap.add_argument("--out", default=None, help="output directory "
                                                "(default tandem-results/mutate-<suite>)")
    ap.add_argument("--mutants", default=str(MUTANTS), help="mutant list (TOML)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per parity run (default: 4x the control run + 60)")
    ap.add_argument("--full", action="store_true",
                    help="run every case of a failing run (default: stop at the first "
                         "failing case)")
    args = ap.parse_args(argv)
    try:
        mutants = load_mutants(Path(args.mutants))
        if args.only:
            unknown = sorted(set(args.only) - {m.name for m in mutants})
            if unknown:
                raise MutantError(f"--only: unknown mutants {unknown} (known: "
                                  f"{', '.join(m.name for m in mutants)})")
            mutants = [m for m in mutants if m.name in args.only]
        check_all(mutants)
    except MutantError as e:
        print(f"mutate: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        w = max(len(m.name) for m in mutants)
        for m in mutants:
            print(f"{m.name:<{w}}  {m.file:<26} {m.models}")
        return 0
    if args.jobs < 1:
        print("mutate: error: --jobs must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out or f"tandem-results/mutate-{args.suite}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    workers = [Scratch(REPO, Path(tempfile.gettempdir())) for _ in range(args.jobs)]
    try:
        control = run_one(workers[0], None, args.suite, out, args.timeout or 1800, args.full)
        print(f"control: {control.result} ({control.seconds:.1f} s, build {control.build_s:.1f}"
              f" s)", flush=True)
        if control.result != "control-pass":
            print(f"mutate: the unmutated engine does not pass `tandem parity --suite "
                  f"{args.suite}` ({control.first_failure or control.detail}); stopping",
                  file=sys.stderr)
            return 2
        timeout = args.timeout or 4 * control.seconds + 60
        todo: queue.Queue = queue.Queue()
        for i, m in enumerate(mutants):
            todo.put((i, m))
        results: list[Outcome | None] = [None] * len(mutants)
        lock = threading.Lock()

        def work(w: Scratch) -> None:
            while True:
                try:
                    i, m = todo.get_nowait()
                except queue.Empty:
                    return
                o = run_one(w, m, args.suite, out, timeout, args.full)
                results[i] = o
                with lock:
                    print(f"{m.name:<28} {o.result:<11} {o.seconds:6.1f} s  {o.first_failure}",
                          flush=True)

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for f in [pool.submit(work, w) for w in workers]:
                f.result()
    finally:
        for w in workers:
            w.close()
    outcomes = [o for o in results if o is not None]
    wall = time.perf_counter() - t_start
    md = markdown(outcomes, control, args.suite, wall)
    (out / "kill_table.md").write_text(md)
    (out / "kill_table.json").write_text(json.dumps({
        "suite": args.suite, "wall_s": round(wall, 1), "control": asdict(control),
        "summary": summary(outcomes), "mutants": [asdict(o) for o in outcomes]}, indent=2))
    print("\n" + md)
    print(f"-> {out / 'kill_table.md'}, {out / 'kill_table.json'}")
    return 0 if all(o.result in ("killed", "crash") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
