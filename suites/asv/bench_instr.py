"""Instructions per engine optimizer step of the tiny cpu-smoke case, counted by valgrind's
callgrind: deterministic, so the one engine number that the machine's load cannot move.

A child Python process builds the one-stage engine (threads = 1: OpenMP spin-waits would make
the count depend on scheduling), runs STEPS optimizer steps under callgrind, and the count is
the instructions executed inside the engine's own code (libtandem, plus libgomp and libm that
it calls) divided by STEPS; Python, numpy and the loader are left out. Valgrind runs the AVX2
GEMM path (it does not emulate AVX-512), so this tracks the engine's work, not this machine's
fastest path. Skips when valgrind is absent or fails. Lower is better.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from . import load_case, skip

STEPS = 2
OBJECTS = re.compile(r"(libtandem[^/]*\.so|libgomp[^/]*\.so|libm[.-][^/]*so)")

# Runs in the child under valgrind: argv = suite, case, steps.
DRIVER = r"""
import sys
from harness.config import load_suite
from harness.data import make_case_data
from harness.engine import Model
from harness.init import init_params
suite, name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = load_suite(suite).case(name)
m, o = c.model, c.optim
M = c.pipeline.microbatches
b = c.batch_size // M
model = Model(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, vocab_size=m.vocab_size,
              n_positions=m.n_positions, seq_len=c.seq_len, batch_size=b, threads=1, lr=o.lr,
              beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
              grad_clip=o.grad_clip)
model.set_params(init_params([(p.name, p.shape) for p in model.table], m.n_layer, c.seed))
x, y = make_case_data(c)
for i in range(steps):
    k = i % len(x)
    model.train_step(x[k].reshape(M, b, c.seq_len), y[k].reshape(M, b, c.seq_len))
print("ok")
"""


def self_instructions(path: str, objects: re.Pattern = OBJECTS) -> int:
    """Sum of the self cost (first event, Ir) of every function whose object matches `objects`
    in a callgrind output file (format: valgrind docs, "Callgrind Format Specification"). The
    cost line after a `calls=` line is a callee's inclusive cost and is not counted."""
    names: dict[str, str] = {}
    npos, total, current, after_call = 1, 0, "", False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("positions:"):
                npos = len(line.split()) - 1
            elif line.startswith(("ob=", "cob=")):
                # "ob=(id) name" defines a compressed name, "ob=(id)" reuses it; a name may be
                # defined first on a cob= (callee object) line
                m = re.match(r"c?ob=(\(\d+\))?\s*(.*)", line.rstrip("\n"))
                ident, name = m.group(1), m.group(2)
                if ident and name:
                    names[ident] = name
                if line.startswith("ob="):
                    current = names.get(ident, "") if ident and not name else name
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if not after_call and objects.search(current):
                    fields = line.split()
                    if len(fields) > npos:
                        total += int(fields[npos])
                after_call = False
    return total


class EngineInstructions:
    """Engine instructions per optimizer step (callgrind); `case` is the cpu-smoke case name."""

    params = [["tiny"]]
    param_names = ["case"]
    timeout = 600

    def setup(self, case):
        load_case(case)  # skips if the suite or case is absent in this commit
        self.valgrind = shutil.which("valgrind")
        if not self.valgrind:
            raise skip("valgrind not found (apt-get install valgrind)")

    def track_instructions_per_step(self, case):
        with tempfile.TemporaryDirectory(prefix="tandem-callgrind-") as d:
            out = os.path.join(d, "callgrind.out")
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
            cmd = [self.valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
                   sys.executable, "-c", DRIVER, "cpu-smoke", case, str(STEPS)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=550)
            if proc.returncode != 0 or "ok" not in proc.stdout:
                tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
                raise RuntimeError(f"valgrind run failed (exit {proc.returncode}):\n{tail}")
            n = self_instructions(out)
        if n == 0:
            raise RuntimeError("callgrind counted no instructions in libtandem")
        return n / STEPS / 1e6

    track_instructions_per_step.unit = "Minstr/step"
    track_instructions_per_step.version = "1"
