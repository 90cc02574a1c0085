#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30) and prints one line per target:
#   fuzz/run.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On the stable toolchain RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass its nightly-only flags (-Zsanitizer=address, -Cpasses=sancov-module).
# The committed seed corpus (corpus/<target>/) is read, never written: new inputs go to
# target/work-corpus/<target>/, crashes to artifacts/<target>/, logs to target/fuzz-logs/.
# Exit status: 0 when every target ran clean, 1 when any target crashed or failed to run.
set -u
cd "$(dirname "$0")"
seconds=${1:-30}
shift $(( $# > 0 ? 1 : 0 ))
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
export RUSTC_BOOTSTRAP=1
mkdir -p target/fuzz-logs
cargo fuzz build >/dev/null 2>target/fuzz-logs/build.log || { echo "build failed: see fuzz/target/fuzz-logs/build.log"; exit 1; }
status=0
for t in "${targets[@]}"; do
    mkdir -p "target/work-corpus/$t" "corpus/$t"
    log="target/fuzz-logs/$t.log"
    cargo fuzz run "$t" "target/work-corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    new=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        result="FAILED rc=$rc (see fuzz/$log; inputs in fuzz/artifacts/$t/)"
        status=1
    fi
    printf '%-22s %4ss  runs=%-10s exec/s=%-8s new=%-5s %-18s rss=%sMB  %s\n' \
        "$t" "$seconds" "${runs:-?}" "${rate:-?}" "${new:-?}" "${cov:-cov: ?}" "${rss:-?}" "$result"
done
exit $status
