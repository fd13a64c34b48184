"""A few bf16 training steps of a GPT-2 shape on the GPU, for kernel profilers and sanitizers
(ncu, nsys, compute-sanitizer) to wrap: no timing, no JAX, seeded weights (harness.init).

  ncu --kernel-name regex:layernorm python3 tools/gpu_steps.py --size 1.5B --layers 1 --steps 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"124M": (12, 768, 12, 16), "350M": (24, 1024, 16, 16), "1.5B": (48, 1600, 25, 8)}


def main(argv=None) -> int:
    from harness import engine
    from harness.init import init_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="124M")
    ap.add_argument("--layers", type=int, help="layers (default: the size's)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    L, C, NH, B = SIZES[args.size]
    cfg = dict(n_layer=args.layers or L, n_embd=C, n_head=NH, vocab_size=50257,
               n_positions=1024)
    with engine.Model(backend="cuda", dtype=args.dtype, batch_size=B, seq_len=1024, **cfg) as m:
        m.set_params(init_params([(p.name, p.shape) for p in m.table], cfg["n_layer"], seed=0))
        ids = np.random.default_rng(1).integers(0, 50257, size=(2, B, 1024), dtype=np.int32)
        for i in range(args.steps):
            loss, norm = m.train_step(ids[0], ids[1])
            print(f"step {i}: loss {loss:.4f} grad norm {norm:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
