"""GPU pipeline check on one GPU: tandem-engine ranks with CUDA stages (sharing the GPU) against
the one-stage CUDA engine on the same weights, tokens and micro-batches, per schedule; prints
each layout's worst loss / final-parameter error, its transport and step time. Device runs only.

    python3 tools/gpu_pipeline_check.py OUTDIR [--dtype fp32|bf16]
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from harness import parity, pipeline
from harness.config import load_suite


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    out, dtype = args.out, args.dtype
    base = load_suite("smoke").case("tiny-1f1b-p2m2")
    rows, ok = [], True
    layouts = [("1f1b", 2, 2, 1), ("gpipe", 2, 4, 1), ("zb-h1", 2, 4, 1), ("1f1b", 4, 4, 1),
               ("zb-h1", 4, 8, 1), ("interleaved", 2, 4, 2)]
    for sched, P, M, V in layouts:
        model = dataclasses.replace(base.model, n_layer=4)
        pipe = dataclasses.replace(base.pipeline, schedule=sched, stages=P, microbatches=M, chunks=V)
        case = dataclasses.replace(base, name=f"{sched}-p{P}m{M}v{V}", model=model, pipeline=pipe,
                                   batch_size=8, backend="cuda", dtype=dtype)
        work = out / case.name
        inp = parity.prepare(case, work, threads=1)
        ctrl = parity._engine_run(inp, 1, M)
        res = pipeline.run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                                    work / "pipe", timeout=300)
        dl = float(np.max(np.abs(res.losses - np.asarray(ctrl.losses)) / np.abs(np.asarray(ctrl.losses))))
        dn = float(np.max(np.abs(res.grad_norms - np.asarray(ctrl.norms)) / np.asarray(ctrl.norms)))
        dp = max(float(np.linalg.norm(res.params[k] - v) / max(np.linalg.norm(v), 1e-30))
                 for k, v in ctrl.params.items() if k.endswith("weight"))
        info = json.loads((res.out_dir / "rank0.json").read_text())
        gate = 2e-2 if dtype == "bf16" else 1e-4  # harness/tolerances.py's schedule gates
        good = dl < gate and dn < gate and dp < gate
        ok &= good
        rows.append((case.name, dl, dn, dp, info["transport"], float(np.median(res.step_s)), good))
    for r in rows:
        print(f"{dtype} {r[0]:22s} loss rel {r[1]:.2e}  grad norm rel {r[2]:.2e}  params rel L2 "
              f"{r[3]:.2e}  {r[4]:9s} step {1e3 * r[5]:.2f} ms  {'PASS' if r[6] else 'FAIL'}")
    (out / "check.json").write_text(json.dumps(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
