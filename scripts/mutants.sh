#!/usr/bin/env bash
# Mutation testing of the modules where a silent bug costs the most (issue 21): each module's
# mutants are built and tested against its own crate's tests only, and the table of outcomes
# is printed at the end.
#
#   scripts/mutants.sh                 # every module below (hours on two cores)
#   scripts/mutants.sh frame handshake # some of them, by the names in the first column
#   MUTANTS_JOBS=2 MUTANTS_TIMEOUT=120 scripts/mutants.sh jwe
#   MUTANTS_CARGO_ARGS="--lib" scripts/mutants.sh handshake  # unit tests only (CI's subset)
#
# Needs cargo-mutants (`cargo install cargo-mutants --locked`) and cargo-nextest. Builds go to
# one reused target directory ($MUTANTS_TARGET, default target/mutants), removed at the end
# unless MUTANTS_KEEP_TARGET=1; per-module reports stay in target/mutants-out/<name>/.
# MUTANTS_IN_PLACE=1 mutates this checkout instead of a copy (cargo mutants --in-place): with
# MUTANTS_TARGET=target the workspace crates the module depends on are not rebuilt for each
# module; do not edit the module's crate meanwhile (each file is restored after its mutant).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0 CARGO_TERM_COLOR=never

# name | package | file(s), comma-separated
MODULES=(
    "frame|tunnel|tunnel/src/frame.rs"
    "handshake|tunnel|tunnel/src/handshake.rs"
    "jwe|kbs-core|server/core/src/jwe.rs"
    "token|kbs-core|server/core/src/token.rs,server/core/src/token/es256.rs"
    "binding|kbs-core|server/core/src/attest/binding.rs"
    "rotation-engine|kbs-plugin-rotation|server/plugins/rotation/src/engine/mod.rs"
    "rotation-deliver|kbs-plugin-rotation|server/plugins/rotation/src/deliver.rs"
    "guest-store|guest-daemon|guest-daemon/src/store.rs,guest-daemon/src/store/*.rs"
    "guest-service|guest-daemon|guest-daemon/src/service.rs"
    "snp-crl|tee-verifiers|server/tee-verifiers/src/snp/crl.rs"
)

jobs="${MUTANTS_JOBS:-1}"
timeout="${MUTANTS_TIMEOUT:-300}"
target="${MUTANTS_TARGET:-$PWD/target/mutants}"
out_root="$PWD/target/mutants-out"
# --in-place builds one mutant at a time, copies nothing, and refuses --jobs and --gitignore.
where=(--jobs "$jobs" --gitignore true)
if [ "${MUTANTS_IN_PLACE:-0}" = 1 ]; then where=(--in-place); fi
mkdir -p "$out_root"

wanted=("$@")
selected() {
    [ "${#wanted[@]}" -eq 0 ] && return 0
    local w
    for w in "${wanted[@]}"; do [ "$w" = "$1" ] && return 0; done
    return 1
}

ran=()
for entry in "${MODULES[@]}"; do
    IFS='|' read -r name package files <<<"$entry"
    selected "$name" || continue
    args=()
    IFS=',' read -ra globs <<<"$files"
    for f in "${globs[@]}"; do args+=(--file "$f"); done
    printf '\n==> mutants: %s (%s, -p %s)\n' "$name" "$files" "$package"
    # Exit status 2 (missed mutants) and 3 (timeouts) are results, not failures of the run.
    status=0
    CARGO_TARGET_DIR="$target" cargo mutants \
        --package "$package" "${args[@]}" \
        --test-tool nextest "${where[@]}" --timeout "$timeout" --build-timeout 900 \
        --baseline skip --no-shuffle --caught --unviable \
        --output "$out_root/$name" \
        ${MUTANTS_CARGO_ARGS:+--cargo-arg=$MUTANTS_CARGO_ARGS} || status=$?
    case "$status" in 0 | 2 | 3) ;; *) echo "cargo mutants failed on $name ($status)"; exit "$status" ;; esac
    ran+=("$name")
done

printf '\n| module | mutants | caught | missed | timeouts | unviable |\n|---|---|---|---|---|---|\n'
missed_total=0
for name in "${ran[@]}"; do
    json="$out_root/$name/mutants.out/outcomes.json"
    read -r total caught missed timeout unviable < <(jq -r \
        '[.total_mutants, .caught, .missed, .timeout, .unviable] | @tsv' "$json")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$name" "$total" "$caught" "$missed" "$timeout" "$unviable"
    missed_total=$((missed_total + missed))
done
for name in "${ran[@]}"; do
    missed_file="$out_root/$name/mutants.out/missed.txt"
    if [ -s "$missed_file" ]; then
        printf '\nmissed in %s:\n' "$name"
        cat "$missed_file"
    fi
done

if [ "${MUTANTS_KEEP_TARGET:-0}" != 1 ]; then rm -rf "$target"; fi
# MUTANTS_FAIL_ON_MISSED=1 (CI) turns a missed mutant into a failure.
if [ "${MUTANTS_FAIL_ON_MISSED:-0}" = 1 ] && [ "$missed_total" -gt 0 ]; then
    echo "missed mutants: $missed_total"
    exit 1
fi
