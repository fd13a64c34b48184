"""Where a CUDA training step's device time goes, for any case of any suite (GPT-2 or Llama).

Builds the case's one-stage engine on the GPU (its dtype; random weights at the init scale of
docs/model.md, which timing does not depend on), runs W untimed and K profiled steps of
forward + backward + AdamW with TANDEM_CUDA_PROFILE set (CUDA events between the backend's
phases, engine/cuda/backend.cu), and prints the phase table sorted by device time, with the
step's wall time, tokens/s and MFU (harness.flops, the bench's convention and peak).

  python3 tools/cuda_profile.py --suite llama-gpu --case llama-1b --steps 4
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def random_params(table, n_layer: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normal weights at 0.02 (projections 0.02/sqrt(2L)), norms and biases as initialised:
    the values only need to be finite and of a training-like scale."""
    from harness.init import init_rule

    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 22, dtype=np.float32)
    out = {}
    for i, p in enumerate(table):
        kind, std = init_rule(p.name, n_layer)
        n = int(np.prod(p.shape))
        if kind == "normal":
            a = np.resize(np.roll(pool, 7919 * i), n).reshape(p.shape) * np.float32(std)
        else:
            a = np.full(p.shape, 1.0 if kind == "ones" else 0.0, np.float32)
        out[p.name] = a
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True, help="suite name or path")
    ap.add_argument("--case", required=True, help="case name in the suite")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    ap.add_argument("--steps", type=int, default=4, help="profiled steps (default 4)")
    args = ap.parse_args(argv)

    from harness.bench_sides import engine_config
    from harness.config import load_suite
    from harness.engine import Model
    from harness.flops import flops_for_case, mfu
    from harness.init import write_safetensors

    suite = load_suite(args.suite)
    hits = [c for c in suite.cases if c.name == args.case]
    if not hits:
        ap.error(f"no case {args.case!r} in suite {suite.name} "
                 f"(cases: {', '.join(c.name for c in suite.cases)})")
    case = hits[0]
    if case.backend != "cuda":
        ap.error(f"case {case.name} runs on backend {case.backend!r}: this profiles CUDA cases")
    B, T = case.batch_size, case.seq_len
    rng = np.random.default_rng(1)
    x = rng.integers(0, case.model.vocab_size, size=(B, T), dtype=np.int32)
    y = rng.integers(0, case.model.vocab_size, size=(B, T), dtype=np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        prof = Path(tmp) / "profile.tsv"
        os.environ["TANDEM_CUDA_PROFILE"] = str(prof)
        os.environ["TANDEM_CUDA_PROFILE_SKIP"] = str(args.warmup)  # GEMM tuning runs in these
        m = Model(**engine_config(case, 1, batch_size=B))
        try:
            # one file, one upload (set_param would move the whole buffer once per tensor)
            write_safetensors(Path(tmp) / "w.safetensors", random_params(m.table, case.model.n_layer))
            m.load_safetensors(Path(tmp) / "w.safetensors")
            for _ in range(args.warmup):
                m.train_step(x[None], y[None])
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                m.train_step(x[None], y[None])
                times.append(time.perf_counter() - t)
        finally:
            m.close()  # the profile is written at release
            del os.environ["TANDEM_CUDA_PROFILE"], os.environ["TANDEM_CUDA_PROFILE_SKIP"]
        rows = list(csv.DictReader((ln for ln in prof.read_text().splitlines()
                                    if not ln.startswith("#")), delimiter="\t"))
    step = float(np.median(times))
    tps = B * T / step
    print(f"{suite.name}/{case.name}: B={B} T={T} {case.dtype}; median step {step * 1e3:.1f} ms "
          f"over {len(times)} (all {', '.join(f'{t * 1e3:.1f}' for t in times)} ms), "
          f"{tps / 1e3:.1f}k tok/s, MFU {100 * mfu(flops_for_case(case), tps, 989e12):.1f}% "
          "(989 TFLOP/s bf16 datasheet)")
    print(f"(device time per phase over the {args.steps} profiled steps, warm-up excluded; share "
          "of the device time counted)")
    print(f"{'phase':<34} {'ms/step':>9} {'share':>7} {'calls':>7}")
    for r in sorted(rows, key=lambda r: -float(r["total_ms"])):
        print(f"{r['phase']:<34} {float(r['ms_per_step']):>9.2f} {100 * float(r['share']):>6.1f}% "
              f"{int(r['calls']):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
