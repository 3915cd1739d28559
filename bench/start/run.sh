#!/usr/bin/env bash
# bench/start: from "start it" to its first healthy answer (GET /healthz: 200), for the same
# image (the hello app from scratch, with its libraries) under the process driver, the
# isolating driver (on the host's network, and on a bridge), the runc driver, plain `runc run`
# and plain `podman run` (Debian's packages, both on runc); medians of RUNS. Then blue-green
# deploys of 10 instances with the process and the isolating driver.
# Targets (issue 13): the isolating driver within 1.5x of the process driver, and faster than
# podman.
#
# Usage: bench/start/run.sh [RUNS] [DEPLOYS]   (as root)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-20}
deploys=${2:-5}
. bench/lib.sh
need runc runc
need podman podman

cargo build --release --workspace --quiet
cargo build --release -p phoenix-driver --example start_bench --quiet
phoenix=$PWD/target/release/phoenix
hello=$PWD/target/release/hello
harness=$PWD/target/release/examples/start_bench
work=$(mktemp -d)
up=""
cleanup() {
    [ -n "$up" ] && kill -INT "$up" 2>/dev/null && wait "$up" 2>/dev/null
    podman --runtime runc rmi -f localhost/phoenix-bench:hello >/dev/null 2>&1 || true
    rm -rf "$work"
    return 0
}
trap cleanup EXIT

fleet() { # driver instances version
    local extra=""
    [ "$1" = process ] && extra='allow_root = true'
    cat > "$work/phoenix.toml" <<TOML
[image.hello]
from = "scratch"
context = "$(dirname "$hello")"
copy = [{ src = "$(basename "$hello")", dst = "/bin/hello", libraries = true }]
env = { VERSION = "$3" }
entrypoint = ["/bin/hello"]

[role.web]
image = "hello"
instances = $2
listen = "127.0.0.1:0"
stop_timeout = "5s"
driver = "$1"
network = "host"
$extra

[role.web.health]
interval = "50ms"
timeout = "1s"
healthy_threshold = 1
unhealthy_threshold = 2

[role.web.deploy]
healthy_timeout = "30s"
drain = "5s"
TOML
}

fleet isolating 1 v0
digest=$(cd "$work" && "$phoenix" --state state bake --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["digest"])')
"$phoenix" --state "$work/state" export "$digest" -o "$work/image.tar" --tag phoenix-bench:hello
podman --runtime runc load -q -i "$work/image.tar" >/dev/null

echo "start to healthy: $(nproc) cores, $runs runs each (after one warm-up), health polled every 1 ms"
"$harness" "$work/state" "$digest" localhost/phoenix-bench:hello "$runs" > "$work/starts.jsonl"

# Deploys of 10 instances: boot to healthy and the whole deploy, process vs isolating driver.
: > "$work/deploys.jsonl"
for driver in process isolating; do
    fleet "$driver" 10 "${driver}0"
    rm -rf "$work/state-$driver"
    (cd "$work" && exec "$phoenix" --state "state-$driver" up -f phoenix.toml > "up-$driver.log" 2>&1) &
    up=$!
    until "$phoenix" --state "$work/state-$driver" status --json 2>/dev/null | grep -q '"live_generation": [0-9]'; do sleep 0.1; done
    for i in $(seq 1 "$deploys"); do
        fleet "$driver" 10 "$driver$i"
        "$phoenix" --state "$work/state-$driver" deploy web --json \
            | python3 -c "import json,sys; r=json.load(sys.stdin); r['driver']='$driver'; print(json.dumps(r))" \
            >> "$work/deploys.jsonl"
    done
    kill -INT "$up"; wait "$up" || true; up=""
done

python3 - "$work/starts.jsonl" "$work/deploys.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = {r["what"]: statistics.median(r["ms"]) for r in rows}
p90 = {r["what"]: sorted(r["ms"])[int(0.9 * (len(r["ms"]) - 1))] for r in rows}
base, podman = med["process driver"], med["podman run"]
print(f"{'':28} {'median':>9} {'p90':>9} {'vs process':>11} {'vs podman':>10}")
for what in ["process driver", "isolating driver", "isolating driver, bridge",
             "runc driver", "runc run", "podman run"]:
    m = med[what]
    print(f"{what:28} {m:7.1f} ms {p90[what]:6.1f} ms {m / base:10.2f}x {m / podman:9.2f}x")
iso = med["isolating driver"]
print(f"isolating / process: {iso / base:.2f}x (target <= 1.5x); "
      f"isolating / podman: {iso / podman:.2f}x (target < 1x)")
deploys = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
print()
for driver in ["process", "isolating"]:
    mine = [d for d in deploys if d["driver"] == driver]
    if not mine:
        continue
    boot = statistics.median(d["boot_to_healthy_ms"] for d in mine)
    total = statistics.median(d["total_ms"] for d in mine)
    print(f"deploy of 10 instances, {driver:9} driver ({len(mine)} deploys, medians): "
          f"boot to healthy {boot:.0f} ms, whole deploy {total:.0f} ms")
PY
