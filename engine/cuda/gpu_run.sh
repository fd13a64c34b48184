#!/usr/bin/env bash
# gpu_run.sh OUTDIR [SIZES] — on a GPU host: build libtandem with CUDA, hold it to the CPU engine
# and to JAX (tests/engine/test_cuda.py), then time it against JAX (engine/cuda/bench_gpu.py).
# Writes cmake.log, parity.json/.txt, bench.json/.csv/.txt under OUTDIR. The benchmark's attention
# follows TANDEM_CUDA_ATTENTION (unset: the engine's default; results/gpu was measured with flash).
set -o pipefail
OUT=${1:?usage: gpu_run.sh OUTDIR [SIZES]}
SIZES=${2:-124M,1.5B,350M}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TANDEM_LIB_DIR=build/gpu PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
(cmake -S engine -B build/gpu -DTD_CUDA=ON -DTD_TESTS=OFF && cmake --build build/gpu -j16) \
    > "$OUT/cmake.log" 2>&1 || { tail -60 "$OUT/cmake.log"; exit 1; }
grep "CUDA backend" "$OUT/cmake.log"
timeout 200 python3 tests/engine/test_cuda.py --json "$OUT/parity.json" 2>&1 | tee "$OUT/parity.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py \
    -k "refused or cpu_only or config_error or needs_bf16" 2>&1 | tail -3 | tee -a "$OUT/parity.txt"
timeout 420 python3 engine/cuda/bench_gpu.py --sizes "$SIZES" --warmup 3 --steps 10 \
    --profile 124M --timeout 300 --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
