#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 30): the gossip packet decoder, goss
# check files, image layers, OCI archives, fleet files, load scenarios and the proxy's HTTP
# heads. Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly; cargo
# install cargo-fuzz`). Crashes are kept in fuzz/artifacts/TARGET and fail the run.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(gossip_packet check_file layer oci_archive fleet_file load_scenario http_head memberlist_wire)
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 \
        -print_final_stats=1 > "$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz $target failed: the input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E "^stat::number_of_executed_units" "$log" || tail -5 "$log"
done
