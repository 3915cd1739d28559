#!/usr/bin/env bash
# bench/proxy/switch.sh: 100 generation switches with drain under constant load, with Phoenix
# (real blue-green deploys of the hello app: new instances boot, traffic switches, the old
# ones drain and stop) and with HAProxy's runtime API on two groups of nginx backends
# (ready the new group, `set server ... state drain` the old, wait, then maint). Counts the
# failed requests of each, and Phoenix's reconfiguration latency (switch -> first request
# routed to the new generation).
#
# Usage: bench/proxy/switch.sh [SWITCHES]
set -euo pipefail
cd "$(dirname "$0")/../.."
switches=${1:-100}

source bench/lib.sh
need haproxy haproxy
need nginx nginx
cargo build --release --workspace --quiet
phoenix=$PWD/target/release/phoenix
hello=$PWD/target/release/hello
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    chmod -R u+w "$work" && rm -rf "$work"
    return 0
}
trap cleanup EXIT

start_load() { python3 bench/load.py "$1" 4 > "$work/load.txt" & load=$!; pids+=($load); sleep 1; }
stop_load() { kill "$load"; wait "$load" || true; read -r sent failed < "$work/load.txt"; }

# ---- Phoenix: real deploys alternating between two baked images ----
fleet() {
    cat > "$work/phoenix.toml" <<TOML
[image.hello]
from = "scratch"
context = "$(dirname "$hello")"
copy = [{ src = "$(basename "$hello")", dst = "/bin/hello", libraries = true }]
env = { VERSION = "$1" }
entrypoint = ["/bin/hello"]

[role.web]
image = "hello"
instances = 3
listen = "127.0.0.1:0"
network = "host"   # containers (the default driver) on the host's network: traffic stays on loopback

[role.web.health]
interval = "100ms"
healthy_threshold = 2

[role.web.deploy]
healthy_timeout = "30s"
drain = "5s"
TOML
}
fleet a
(cd "$work" && exec "$phoenix" --state state up -f phoenix.toml > up.log 2>&1) & pids+=($!)
until "$phoenix" --state "$work/state" status --json 2>/dev/null | grep -q '"live_generation": [0-9]'; do sleep 0.1; done
image_a=$("$phoenix" --state "$work/state" images --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["digest"])')
fleet b
image_b=$(cd "$work" && "$phoenix" --state state bake --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["digest"])')
addr=$("$phoenix" --state "$work/state" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["roles"][0]["listen"])')

start_load "$addr"
: > "$work/reports.jsonl"
for i in $(seq "$switches"); do
    if [ $((i % 2)) -eq 1 ]; then image=$image_b; else image=$image_a; fi
    "$phoenix" --state "$work/state" deploy web --image "$image" --json | tr -d '\n' >> "$work/reports.jsonl"
    echo >> "$work/reports.jsonl"
done
stop_load
phoenix_sent=$sent phoenix_failed=$failed

# ---- HAProxy: runtime API over two groups of nginx backends ----
cat > "$work/backends.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backends.pid;
error_log $work/backends.err;
events { worker_connections 4096; }
http {
    access_log off;
$(for p in 1 2 3 4 5 6; do echo "    server { listen 127.0.0.1:1820$p; location / { return 200 \"hello from backend $p\n\"; } }"; done)
}
CONF
cat > "$work/haproxy.cfg" <<CONF
global
    maxconn 4096
    stats socket $work/haproxy.sock mode 600 level admin
defaults
    mode http
    option http-keep-alive
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:18200
    default_backend be
backend be
    balance roundrobin
$(for p in 1 2 3; do echo "    server s$p 127.0.0.1:1820$p"; done)
$(for p in 4 5 6; do echo "    server s$p 127.0.0.1:1820$p disabled"; done)
CONF
nginx -c "$work/backends.conf" -p "$work" & pids+=($!)
haproxy -f "$work/haproxy.cfg" -db > "$work/haproxy.log" 2>&1 & pids+=($!)
sleep 1
start_load 127.0.0.1:18200
python3 - "$work/haproxy.sock" "$switches" <<'PY'
import socket, sys, time
sock_path, switches = sys.argv[1], int(sys.argv[2])
def cmd(line):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall((line + "\n").encode())
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out.decode()
def sessions(servers):
    stats = cmd("show stat").splitlines()
    head = stats[0].lstrip("# ").split(",")
    rows = [dict(zip(head, r.split(","))) for r in stats[1:] if r]
    return sum(int(r["scur"] or 0) for r in rows if r["svname"] in servers)
groups = (["s1", "s2", "s3"], ["s4", "s5", "s6"])
for i in range(switches):
    old, new = groups[i % 2], groups[(i + 1) % 2]
    for s in new:
        cmd(f"set server be/{s} state ready")
    for s in old:
        cmd(f"set server be/{s} state drain")
    deadline = time.time() + 5
    while sessions(old) and time.time() < deadline:
        time.sleep(0.005)
    for s in old:
        cmd(f"set server be/{s} state maint")
    time.sleep(0.2)
PY
stop_load
haproxy_sent=$sent haproxy_failed=$failed

python3 - "$work/reports.jsonl" "$phoenix_sent" "$phoenix_failed" "$haproxy_sent" "$haproxy_failed" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
p_sent, p_failed, h_sent, h_failed = map(int, sys.argv[2:])
first = sorted(r["first_request_after_switch_us"] for r in rows if r.get("first_request_after_switch_us") is not None)
def pct(values, q):
    return values[min(len(values) - 1, int(q * len(values)))]
print(f"{len(rows)} generation switches with drain under constant load (4 keep-alive clients)")
print(f"  phoenix  {p_sent:>8} requests {p_failed:>5} failed   (real deploys: boot 3 instances, switch, drain, stop)")
print(f"  haproxy  {h_sent:>8} requests {h_failed:>5} failed   (runtime API: ready / drain / maint on 2x3 nginx servers)")
print(f"  phoenix deploy: median {statistics.median(r['total_ms'] for r in rows):.0f} ms, switch median {statistics.median(r['switch_us'] for r in rows):.0f} us")
if first:
    print(f"  reconfiguration latency (switch -> first request on the new generation): "
          f"p50 {pct(first, 0.5)} us, p99 {pct(first, 0.99)} us, max {first[-1]} us over {len(first)} switches (target < 50 ms)")
PY
