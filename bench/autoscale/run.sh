#!/usr/bin/env bash
# bench/autoscale: with Phoenix's own open-loop load generator (`phoenix load`):
#  1. a load step on a one-instance role with rps_per_instance target tracking: the time from
#     the step to the first new instance serving, and to the final size;
#  2. a steady load near the target: how many times the size changes (flapping);
#  3. chaos at one kill every 2 s for 60 s under load: failed requests and the time to replace
#     each killed instance.
# Usage: bench/autoscale/run.sh [STEADY_SECONDS] [CHAOS_SECONDS]   (defaults 60 60)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --workspace --quiet
exec /usr/bin/python3 bench/autoscale/run.py "$PWD/target/release" "${1:-60}" "${2:-60}"
