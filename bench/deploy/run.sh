#!/usr/bin/env bash
# bench/deploy: how long one blue-green deploy takes (3 and 10 instances), split into
# bake, boot to healthy, switch and drain, and how many deploys an hour this machine sustains.
# Anchor (talk notes, ../shared/background): Amazon's 1,000 deploys an hour, across a company.
#
# Usage: bench/deploy/run.sh [DEPLOYS_PER_SIZE] [SUSTAINED_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
deploys=${1:-10}
sustained=${2:-60}

cargo build --release --workspace --quiet
phoenix=$PWD/target/release/phoenix
hello=$PWD/target/release/hello
work=$(mktemp -d)
up=""
load=""
cleanup() {
    [ -n "$load" ] && kill "$load" 2>/dev/null
    [ -n "$up" ] && kill -INT "$up" 2>/dev/null && wait "$up" 2>/dev/null
    chmod -R u+w "$work" && rm -rf "$work"
    return 0
}
trap cleanup EXIT

fleet() { # instances version
    cat > "$work/phoenix.toml" <<TOML
[image.hello]
from = "scratch"
context = "$(dirname "$hello")"
copy = [{ src = "$(basename "$hello")", dst = "/bin/hello", libraries = true }]
env = { VERSION = "$2" }
entrypoint = ["/bin/hello"]

[role.web]
image = "hello"
instances = $1
listen = "127.0.0.1:0"
network = "host"   # containers (the default driver) on the host's network: traffic stays on loopback
stop_timeout = "5s"

[role.web.health]
interval = "100ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2

[role.web.deploy]
healthy_timeout = "30s"
drain = "10s"
TOML
}

start_up() {
    rm -rf "$work/state"
    (cd "$work" && exec "$phoenix" --state state up -f phoenix.toml > up.log 2>&1) &
    up=$!
    until "$phoenix" --state "$work/state" status --json 2>/dev/null | grep -q '"live_generation": [0-9]'; do sleep 0.1; done
}

stop_up() {
    kill -INT $up; wait $up || true
}

deploy_json() {
    "$phoenix" --state "$work/state" deploy web --json
}

# Keep-alive GET / from 4 threads until killed; prints "sent failed" on SIGTERM.
start_load() {
    local addr
    addr=$("$phoenix" --state "$work/state" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["roles"][0]["listen"])')
    python3 bench/load.py "$addr" 4 > "$work/load.txt" &
    load=$!
}

stop_load() {
    kill "$load"; wait "$load" || true
    load=""
    read -r sent failed < "$work/load.txt"
    load_line="   under load the whole time: $sent requests, $failed failed"
}

echo "phoenix deploy benchmark: $(nproc) cores; health checks every 100 ms, 2 passes to healthy"
echo "(the first check runs at once, so boot to healthy has a floor of about 100 ms plus process start)"
echo
for size in 3 10; do
    fleet "$size" v0
    start_up
    start_load
    : > "$work/reports.jsonl"
    for i in $(seq 1 "$deploys"); do
        fleet "$size" "v$i"
        deploy_json | tr -d '\n' >> "$work/reports.jsonl"
        echo >> "$work/reports.jsonl"
    done
    stop_load
    stop_up
    python3 - "$work/reports.jsonl" "$size" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(key): return statistics.median(r[key] for r in rows)
print(f"{sys.argv[2]:>2} instances, {len(rows)} deploys (medians): "
      f"total {med('total_ms'):.0f} ms = bake {med('bake_ms'):.0f} ms + boot to healthy {med('boot_to_healthy_ms'):.0f} ms"
      f" + switch {med('switch_us'):.0f} us + drain {med('drain_ms'):.0f} ms + stop {med('stop_ms'):.0f} ms")
PY
    echo "$load_line"
done

echo
fleet 3 s0
start_up
count=0
end=$((SECONDS + sustained))
while [ $SECONDS -lt $end ]; do
    count=$((count + 1))
    fleet 3 "s$count"
    deploy_json > /dev/null
done
stop_up
python3 - "$count" "$sustained" <<'PY'
import sys
count, seconds = int(sys.argv[1]), int(sys.argv[2])
per_hour = count * 3600 / seconds
print(f"sustained: {count} blue-green deploys of 3 instances (each a fresh bake) in {seconds} s"
      f" = {per_hour:.0f} deploys/hour on one machine, {per_hour / 1000:.2f}x the 1,000/hour anchor")
PY
