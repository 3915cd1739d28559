#!/usr/bin/env bash
# bench/proxy: Phoenix's proxy against HAProxy and nginx on the same work, in one run.
#
# Three nginx backends answer a small body on loopback. Each proxy in turn gets CPU 0 alone
# and one thread (HAProxy nbthread 1, nginx worker_processes 1, phoenix proxy --threads 1);
# wrk and the backends share CPU 1. The direct row is wrk straight to one backend. All three
# proxies do the same work: keep-alive both sides, round-robin, X-Forwarded-For added.
#
# Usage: bench/proxy/run.sh [SECONDS] [CONNECTIONS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-10}
connections=${2:-50}
rounds=${3:-3}

source bench/lib.sh
need haproxy haproxy
need nginx nginx
need wrk wrk
cargo build --release -p phoenix --quiet
phoenix=$PWD/target/release/phoenix

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
    return 0
}
trap cleanup EXIT

b1=18101 b2=18102 b3=18103 port=18100
cat > "$work/backends.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backends.pid;
error_log $work/backends.err;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    server { listen 127.0.0.1:$b1; location / { return 200 "hello from backend 1\n"; } }
    server { listen 127.0.0.1:$b2; location / { return 200 "hello from backend 2\n"; } }
    server { listen 127.0.0.1:$b3; location / { return 200 "hello from backend 3\n"; } }
}
CONF
cat > "$work/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$port
    default_backend be
backend be
    balance roundrobin
    http-reuse always
    server s1 127.0.0.1:$b1
    server s2 127.0.0.1:$b2
    server s3 127.0.0.1:$b3
CONF
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    upstream be {
        server 127.0.0.1:$b1;
        server 127.0.0.1:$b2;
        server 127.0.0.1:$b3;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
CONF

taskset -c 1 nginx -c "$work/backends.conf" -p "$work" & pids+=($!)
wait_port $b1

# Runs wrk against port $1 and prints "requests/s p50_ms p99_ms errors".
measure() { wrk_measure "http://127.0.0.1:$1/"; }

start_proxy() {
    case $1 in
        phoenix) taskset -c 0 "$phoenix" proxy --threads 1 --listen 127.0.0.1:$port --backend 127.0.0.1:$b1 --backend 127.0.0.1:$b2 --backend 127.0.0.1:$b3 > "$work/phoenix.log" 2>&1 & ;;
        haproxy) taskset -c 0 haproxy -f "$work/haproxy.cfg" -db > "$work/haproxy.log" 2>&1 & ;;
        nginx) taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" & ;;
    esac
    proxy=$!
    wait_port $port
}

stop_proxy() {
    kill "$proxy"; wait "$proxy" 2>/dev/null || true
    sleep 0.3
}

echo "proxy benchmark: wrk -c$connections for ${seconds}s, $rounds rounds (median), proxies on CPU 0 with one thread"
echo "versions: $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), phoenix $("$phoenix" --version | cut -d' ' -f2)"
: > "$work/results"
for round in $(seq "$rounds"); do
    echo "direct $(measure $b1)" >> "$work/results"
    for name in phoenix haproxy nginx; do
        start_proxy $name
        echo "$name $(measure $port)" >> "$work/results"
        stop_proxy
    done
done
python3 - "$work/results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99, errors = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99), int(errors)))
med = {n: tuple(statistics.median(v[i] for v in r) for i in range(3)) + (sum(v[3] for v in r),) for n, r in rows.items()}
h = med["haproxy"]
print(f"{'':8} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'rps vs haproxy':>15} {'p99 vs haproxy':>15}")
for name in ["direct", "phoenix", "haproxy", "nginx"]:
    rps, p50, p99, errors = med[name]
    print(f"{name:8} {rps:11.0f} {p50:8.3f} {p99:8.3f} {errors:7d} {rps / h[0]:14.2f}x {p99 / h[2]:14.2f}x")
p = med["phoenix"]
print(f"\ntargets: phoenix requests/s >= 1.0x haproxy: {'met' if p[0] >= h[0] else 'NOT met'} ({p[0] / h[0]:.2f}x); "
      f"p99 <= haproxy: {'met' if p[2] <= h[2] else 'NOT met'} ({p[2] / h[2]:.2f}x)")
PY
