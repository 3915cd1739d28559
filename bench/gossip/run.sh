#!/usr/bin/env bash
# bench/gossip: Serf and Phoenix agents side by side on loopback, one cluster after the other.
#
# For each N, N agents on 127.1.x.y addresses join the first one; once every agent is listed
# alive, the probe (crates/gossip/examples/gossip_probe.rs) talks Serf's RPC protocol to all of
# them: it fires user events without coalescing at the first agent and times the spread from
# the origin's own delivery to the last agent (p50 and max), then kill -9's the last KILLS
# agents one after the other (default 3) and times until every other agent reports each failed
# (median and max), counting false failures.
#
# Usage: bench/gossip/run.sh [EVENTS] [SIZES...]        (default: 10 events; 10 30 100, and
#        300 for Phoenix alone)
# Environment: REST (seconds of the bandwidth window, 20), SETTLE (seconds between convergence
# and that window, 2), KILLS (agents killed one after the other, 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-10}
shift || true
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10 30 100 300)

source bench/lib.sh
need serf serf
cargo build --release -p phoenix --quiet
cargo build --release -p phoenix-gossip --example gossip_probe --quiet
phoenix=$PWD/target/release/phoenix
probe=$PWD/target/release/examples/gossip_probe

work=$(mktemp -d)
pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT

ip_of() { echo "127.1.$(($1 / 200)).$(($1 % 200 + 1))"; }

start() { # kind index
    local ip; ip=$(ip_of "$2")
    local join=()
    [ "$2" -eq 0 ] || join=(--join "$(ip_of 0):7946")
    case $1 in
        serf) serf agent -node="n$2" -bind="$ip:7946" -rpc-addr="$ip:7373" -log-level=err \
                  ${join[@]+"-join=$(ip_of 0):7946"} > "$work/$1-$2.log" 2>&1 & ;;
        phoenix) "$phoenix" agent --node "n$2" --bind "$ip:7946" --rpc-addr "$ip:7373" \
                  ${join[@]+"${join[@]}"} > "$work/$1-$2.log" 2>&1 & ;;
    esac
    pids+=($!)
}

alive_count() { # kind
    local out
    case $1 in
        serf) out=$(serf members -rpc-addr="$(ip_of 0):7373" -status=alive 2>/dev/null || true) ;;
        phoenix) out=$("$phoenix" members --rpc-addr "$(ip_of 0):7373" --status alive 2>/dev/null || true) ;;
    esac
    [ -z "$out" ] && echo 0 || echo "$out" | wc -l
}

run() { # kind n
    local kind=$1 n=$2
    for i in $(seq 0 $((n - 1))); do
        start "$kind" "$i"
        [ "$i" -eq 0 ] && sleep 0.3
    done
    local waited=0
    until [ "$(alive_count "$kind")" -eq "$n" ]; do
        sleep 0.5; waited=$((waited + 1))
        if [ $waited -gt 240 ]; then echo "$kind $n: never converged ($(alive_count "$kind") alive)" >&2; stop_all; return 1; fi
    done
    sleep "${SETTLE:-2}"
    local before after
    before=$(cat /sys/class/net/lo/statistics/tx_bytes)
    sleep "${REST:-20}"
    after=$(cat /sys/class/net/lo/statistics/tx_bytes)
    local rest_bps=$(( (after - before) / n / ${REST:-20} ))
    local rpcs=()
    for i in $(seq 0 $((n - 1))); do rpcs+=("$(ip_of "$i"):7373"); done
    local victims=() kills=${KILLS:-3}
    for i in $(seq $((n - kills)) $((n - 1))); do victims+=("${pids[$i]}:n$i"); done
    local result
    result=$("$probe" "$events" "$(IFS=,; echo "${victims[*]}")" "${rpcs[@]}")
    result="${result%\}}, \"rest_bytes_per_agent_s\": $rest_bps}"
    echo "$kind $n $result" | tee -a "$work/results"
    stop_all
    sleep 1
}

: > "$work/results"
for n in "${sizes[@]}"; do
    [ "$n" -le 100 ] && run serf "$n" || true
    run phoenix "$n" || true
done

python3 - "$work/results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    kind, n, result = line.split(" ", 2)
    rows[(kind, int(n))] = json.loads(result)
def f(v, unit="s"):
    return "—" if v is None else f"{v:.3f}"
def ratio(p, s):
    return "—" if p is None or s in (None, 0) else f"{p / s:.2f}x"
print(f"{'N':>4} | {'event p50 serf/phoenix':>24} | {'event max serf/phoenix (ratio)':>32} | {'failure detection median serf/phoenix (ratio)':>47} | {'detection max serf/phoenix':>27} | {'bytes/agent/s at rest (ratio)':>30} | false failures serf/phoenix")
for n in sorted({n for _, n in rows}):
    s, p = rows.get(("serf", n), {}), rows.get(("phoenix", n), {})
    print(f"{n:>4} | {f(s.get('event_p50_s')):>11} / {f(p.get('event_p50_s')):<10} | "
          f"{f(s.get('event_max_s')):>9} / {f(p.get('event_max_s')):<9} ({ratio(p.get('event_max_s'), s.get('event_max_s')):>6}) | "
          f"{f(s.get('failure_detection_s')):>12} / {f(p.get('failure_detection_s')):<12} ({ratio(p.get('failure_detection_s'), s.get('failure_detection_s')):>6}) | "
          f"{f(s.get('failure_detection_max_s')):>12} / {f(p.get('failure_detection_max_s')):<12} | "
          f"{s.get('rest_bytes_per_agent_s', '—'):>9} / {p.get('rest_bytes_per_agent_s', '—'):<9} ({ratio(p.get('rest_bytes_per_agent_s'), s.get('rest_bytes_per_agent_s')):>6}) | "
          f"{s.get('false_failures', '—')} / {p.get('false_failures', '—')}")
PY
