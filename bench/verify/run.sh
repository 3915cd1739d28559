#!/usr/bin/env bash
# The same 60 checks of this machine (files, ports, processes, commands, users, groups,
# packages, http) with Phoenix, serverspec (local backend) and testinfra, side by side.
# Usage: bench/verify/run.sh [RUNS]   (default 5; prints medians and ratios)
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/lib.sh
need rspec ruby-serverspec
need curl curl
/usr/bin/python3 -c 'import testinfra' 2>/dev/null || { apt-get update -q && apt-get install -y -q python3-testinfra; }
cargo build --release -q -p phoenix
exec /usr/bin/python3 bench/verify/run.py "$PWD/target/release/phoenix" "${1:-5}"
