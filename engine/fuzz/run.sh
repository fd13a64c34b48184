#!/usr/bin/env bash
# Runs every fuzz target built by build.sh on its seed corpus and dictionary:
#   engine/fuzz/run.sh BUILD_DIR SECONDS_PER_TARGET [WORK_DIR]
# New inputs go to WORK_DIR/<target> (default: a temporary directory), never into the committed
# corpus. Exits non-zero at the first target that crashes or trips a sanitizer, after printing
# libFuzzer's report and the reproducer's path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="${1:?usage: run.sh BUILD_DIR SECONDS [WORK_DIR]}"
seconds="${2:?usage: run.sh BUILD_DIR SECONDS [WORK_DIR]}"
work="${3:-$(mktemp -d)}"
status=0
for exe in "$build"/fuzz_*; do
    target="$(basename "$exe")"
    target="${target#fuzz_}"
    mkdir -p "$work/$target"
    dict=()
    [ -f "$here/$target.dict" ] && dict=(-dict="$here/$target.dict")
    echo "run.sh: $target for ${seconds}s"
    if ! (cd "$work" && "$exe" "${dict[@]}" -max_total_time="$seconds" -print_final_stats=1 \
            -artifact_prefix="$work/$target-" "$work/$target" "$here/corpus/$target" \
            > "$work/$target.log" 2>&1); then
        tail -n 60 "$work/$target.log"
        echo "run.sh: $target FAILED (reproducer: $(ls "$work/$target-"* 2>/dev/null | head -1))" >&2
        status=1
        break
    fi
    # the last status line (executions, cov: edges, ft: features, corpus) and the totals
    grep -E '^#[0-9]+' "$work/$target.log" | tail -n 1 || true
    grep -E 'stat::(number_of_executed_units|new_units_added|peak_rss_mb)' "$work/$target.log" || true
done
exit $status
