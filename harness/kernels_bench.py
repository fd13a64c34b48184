"""GEMM micro-benchmark: the engine's td_gemm against numpy (OpenBLAS) on GPT-2's matmul shapes.

    python3 -m harness.kernels_bench [--tokens 256] [--repeats 5] [--out DIR]

Every forward and backward GEMM of a GPT-2 124M layer and its LM head at B·T = --tokens, in the
layout the engine runs it (x @ W, dout @ W^T, x^T @ dout, and the tied head's transposes),
timed alternately engine / numpy, best of --repeats after a warm-up. Prints a table and, with
--out, appends records (side engine|numpy, metric gflops, case = shape) to DIR/records.parquet
so `tandem report` shows them. Not a pass/fail test: numbers from a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from harness.engine import Ops, version
from harness.records import RECORD_COLUMNS, Record, append_parquet, to_frame


def shapes(tokens: int, C: int = 768, V: int = 50257) -> list[tuple[str, int, int, int, bool, bool]]:
    """(name, M, N, K, transA, transB) for C (+)= op(A) @ op(B), op(A) M x K, op(B) K x N."""
    out = []
    for name, ic, oc in (("qkv", C, 3 * C), ("attproj", C, C), ("fc", C, 4 * C),
                         ("fcproj", 4 * C, C)):
        out += [(f"{name} fwd", tokens, oc, ic, False, False),
                (f"{name} dinp", tokens, ic, oc, False, True),
                (f"{name} dW", ic, oc, tokens, True, False)]
    out += [("lmhead fwd", tokens, V, C, False, True),
            ("lmhead dinp", tokens, C, V, False, False),
            ("lmhead dW", V, C, tokens, True, False)]
    return out


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(tokens: int = 256, repeats: int = 5, out: Path | None = None) -> list[dict]:
    ops, rng = Ops(), np.random.default_rng(0)
    rows, records = [], []
    for name, M, N, K, ta, tb in shapes(tokens):
        A = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        B = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        a_op, b_op = (A.T if ta else A), (B.T if tb else B)
        flops = 2.0 * M * N * K
        t_engine = _time(lambda: ops.gemm(A, B, ta, tb), repeats)
        t_numpy = _time(lambda: a_op @ b_op, repeats)
        got, want = ops.gemm(A, B, ta, tb), a_op @ b_op
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        row = dict(shape=name, M=M, N=N, K=K, engine_gflops=flops / t_engine / 1e9,
                   numpy_gflops=flops / t_numpy / 1e9, ratio=t_numpy / t_engine, rel_l2=rel)
        rows.append(row)
        for side, t in (("engine", t_engine), ("numpy", t_numpy)):
            records.append(Record(suite="kernels", case=f"gemm {name}", side=side,
                                  metric="gflops", value=flops / t / 1e9, unit="GFLOP/s",
                                  n_embd=768, vocab_size=50257, seq_len=tokens))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        append_parquet(out / "records.parquet", to_frame(records, RECORD_COLUMNS))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m harness.kernels_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="B*T rows (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, metavar="DIR")
    args = p.parse_args(argv)
    rows = run(args.tokens, args.repeats, args.out)
    print(f"td_gemm ({version()}) vs numpy {np.__version__}, B*T = {args.tokens}, best of "
          f"{args.repeats}")
    print(f"{'shape':<14}{'M':>7}{'N':>7}{'K':>7}{'engine GF/s':>13}{'numpy GF/s':>12}"
          f"{'engine/numpy':>14}{'rel L2':>10}")
    for r in rows:
        print(f"{r['shape']:<14}{r['M']:>7}{r['N']:>7}{r['K']:>7}{r['engine_gflops']:>13.1f}"
              f"{r['numpy_gflops']:>12.1f}{r['ratio']:>13.2f}x{r['rel_l2']:>10.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
