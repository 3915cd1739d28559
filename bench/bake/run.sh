#!/usr/bin/env bash
# Bake a 200 MB tree of mixed files (source-like text, random binaries, logs, many small
# files) with Phoenix, cold and warm, against the practical limit on this machine
# (`tar --sort=name | gzip -n | sha256sum` of the same tree) and against umoci building the
# same layer; then an unchanged rebake. Prints medians and ratios.
# Usage: bench/bake/run.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/lib.sh
need umoci umoci
cargo build --release -q -p phoenix
exec /usr/bin/python3 bench/bake/run.py "$PWD/target/release/phoenix" "${1:-3}"
