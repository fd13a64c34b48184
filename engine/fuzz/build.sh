#!/usr/bin/env bash
# Builds the engine's libFuzzer targets with clang under AddressSanitizer + UBSan:
#   engine/fuzz/build.sh [OUT_DIR]        (default /tmp/tandem-fuzz)
# One executable per engine/fuzz/fuzz_<name>.c, linked with the engine's CPU sources (no OpenMP,
# no MPI). Run one with its seed corpus and dictionary, e.g.
#   OUT/fuzz_safetensors -dict=engine/fuzz/safetensors.dict WORK_DIR engine/fuzz/corpus/safetensors
# (docs/fuzzing.md; engine/fuzz/run.sh runs every target for a few seconds).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
engine="$(dirname "$here")"
out="${1:-/tmp/tandem-fuzz}"
cc="${CC_FUZZ:-clang}"
if ! command -v "$cc" > /dev/null; then
    echo "build.sh: '$cc' not found. HINT: apt-get install -y clang (libFuzzer ships with it)" >&2
    exit 2
fi
mkdir -p "$out"
flags=(-std=c11 -g -O1 -fno-omit-frame-pointer -D_GNU_SOURCE
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$engine/include" -I"$engine/src" -I"$engine/runtime")
# libtandem's CPU sources as engine/CMakeLists.txt lists them (TD_SOURCES, TD_CPU_ONLY_SOURCES)
read -r -a srcs <<< "$(sed -n 's/^set(TD_\(CPU_ONLY_\)\{0,1\}SOURCES \(.*\))$/\2/p' "$engine/CMakeLists.txt" | tr '\n' ' ')"
if [ "${#srcs[@]}" -lt 2 ]; then
    echo "build.sh: cannot read TD_SOURCES / TD_CPU_ONLY_SOURCES from $engine/CMakeLists.txt" >&2
    exit 1
fi
lib=("${srcs[@]/#/$engine/}" "$engine"/runtime/{runtime,runfile}.c)
# the engine's sources once, then one link per target (runtime.c's executor is linked but never
# called: parsing needs no comm backend)
objs=() pids=()
for src in "${lib[@]}"; do
    obj="$out/obj_$(basename "$src" .c).o"
    "$cc" "${flags[@]}" -c -o "$obj" "$src" &
    objs+=("$obj") pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "build.sh: compiling the engine's sources failed" >&2; exit 1; }
done
for src in "$here"/fuzz_*.c; do
    name="$(basename "$src" .c)"
    echo "build.sh: $out/$name"
    "$cc" "${flags[@]}" -o "$out/$name" "$src" "${objs[@]}" -lm
done
