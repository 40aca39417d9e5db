#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: scripts/fuzz.sh [seconds-per-target]
# [target...] (default 60 s, all targets). Needs nightly and cargo-fuzz (installed when missing).
#
# Seeds are fuzz/seeds/<target>/ and dictionaries fuzz/dicts/<target>.dict (checked in); what the fuzzer finds goes to fuzz/corpus/<target>/
# and crashes to fuzz/artifacts/<target>/ (neither is checked in). No sanitizer: every crate
# forbids unsafe code, so the fuzzer hunts panics, overflows (debug assertions are on),
# runaway memory (-rss_limit_mb) and hangs (-timeout); without ASan it runs several times
# faster. A summary line per target gives executions and the outcome; the exit status is
# non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export CARGO_INCREMENTAL=0
seconds="${1:-60}"
shift || true

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build -s none -a

failed=()
printf '%-18s %14s %10s  %s\n' target executions exec/s outcome
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="$(mktemp)"
    status=ok
    dict=()
    [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
    cargo +nightly fuzz run -s none -a "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 "${dict[@]}" >"$log" 2>&1 || status=CRASH
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    if [ "$status" != ok ]; then
        failed+=("$t")
        grep -E 'panicked|ERROR: libFuzzer|Test unit written|SUMMARY' "$log" | head -n 8 >&2 || true
    fi
    printf '%-18s %14s %10s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$status"
    rm -f "$log"
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
