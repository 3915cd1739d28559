#!/usr/bin/env bash
# bench/proxy: Phoenix's proxy against HAProxy and nginx on the same work, in one run.
#
# Three nginx backends answer on loopback. Each proxy in turn gets CPU 0 alone and one thread
# (HAProxy nbthread 1, nginx worker_processes 1, phoenix proxy --threads 1); the load tool and
# the backends share CPU 1. The direct row is the load tool straight to one backend. All three
# proxies do the same work: keep-alive to the backends, round-robin, X-Forwarded-For added.
#
# Workload shapes (rows):
#   small       a 21-byte body over $CONNECTIONS kept-alive connections
#   large       a 64 KiB body over $CONNECTIONS kept-alive connections
#   new-conn    a new client connection per request (`Connection: close`)
#   2000-conns  a small body over 2,000 kept-alive connections
#   h2c         HTTP/2 with prior knowledge, h2load -c 20 -m 10 (needs nghttp2-client)
#
# Usage: bench/proxy/run.sh [SECONDS] [CONNECTIONS] [ROUNDS] [WORKLOADS...]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-10}
connections=${2:-50}
rounds=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(small large new-conn 2000-conns h2c)
ulimit -n "$(ulimit -Hn)"  # 2,000 connections need more than the usual 1,024 files

source bench/lib.sh
need haproxy haproxy
need nginx nginx
need wrk wrk
need h2load nghttp2-client
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

b1=18101 b2=18102 b3=18103 port=18100 h2port=18104
head -c 65536 /dev/urandom > "$work/large.bin"
chmod 755 "$work" && chmod 644 "$work/large.bin"  # nginx workers run as nobody
cat > "$work/backends.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backends.pid;
error_log $work/backends.err;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    server { listen 127.0.0.1:$b1; location /large { alias $work/large.bin; } location / { return 200 "hello from backend 1\n"; } }
    server { listen 127.0.0.1:$b2; location /large { alias $work/large.bin; } location / { return 200 "hello from backend 2\n"; } }
    server { listen 127.0.0.1:$b3; location /large { alias $work/large.bin; } location / { return 200 "hello from backend 3\n"; } }
}
CONF
cat > "$work/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$port
    bind 127.0.0.1:$h2port proto h2
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
        listen 127.0.0.1:$h2port http2;
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

# cpu_times: "busy idle" jiffies of CPU 0, then of CPU 1 (from /proc/stat).
cpu_times() { awk '/^cpu[01] /{printf "%d %d ", $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }

# measure WORKLOAD PORT: prints "requests/s p50_ms p99_ms errors proxy_us_per_request
# cpu1_busy_percent" for one workload shape. The proxy's cost is CPU 0's busy time over the
# requests (it runs there alone); CPU 1 holds the load tool and the backends, and when it is
# full, requests/s measures them as much as the proxy.
measure() {
    local before after result
    before=$(cpu_times)
    result=$(run_load "$@")
    after=$(cpu_times)
    python3 - "$result" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import sys
result, before, after, hz = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4])
d = [int(a) - int(b) for a, b in zip(after, before)]
rps = float(result.split()[0])
# busy jiffies of CPU 0 over the requests, in microseconds; wall time from both CPUs' jiffies
seconds = (d[2] + d[3]) / hz
proxy_us = d[0] / hz * 1e6 / (rps * seconds) if rps else float("nan")
print(f"{result} {proxy_us:.1f} {100 * d[2] / (d[2] + d[3]):.0f}")
PY
}

# run_load WORKLOAD PORT: prints "requests/s p50_ms p99_ms errors".
run_load() {
    case $1 in
        small) wrk_measure "http://127.0.0.1:$2/" ;;
        large) wrk_measure "http://127.0.0.1:$2/large" ;;
        new-conn) wrk_measure "http://127.0.0.1:$2/" -H 'Connection: close' ;;
        2000-conns) connections=2000 wrk_measure "http://127.0.0.1:$2/" ;;
        h2c) h2load_measure "http://127.0.0.1:$2/" ;;
    esac
}

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

echo "proxy benchmark: $rounds rounds (median) of ${seconds}s, $connections connections unless the shape says, proxies on CPU 0 with one thread"
echo "versions: $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), phoenix $("$phoenix" --version | cut -d' ' -f2)"
: > "$work/results"
proxies=(phoenix haproxy nginx)
for round in $(seq "$rounds"); do
    for load in "${workloads[@]}"; do
        [ "$load" = h2c ] || echo "$round $load direct $(measure "$load" $b1)" >> "$work/results"
    done
    # The order turns each round, so that no proxy always runs first (drift in the machine's
    # speed over a run would otherwise favour one).
    for i in "${!proxies[@]}"; do
        name=${proxies[$(( (i + round - 1) % ${#proxies[@]} ))]}
        start_proxy $name
        for load in "${workloads[@]}"; do
            # Phoenix tells h2c from HTTP/1.1 by the first bytes; the others need a port for it.
            p=$port
            [ "$load" = h2c ] && [ $name != phoenix ] && p=$h2port
            echo "$round $load $name $(measure "$load" $p)" >> "$work/results"
        done
        stop_proxy
    done
done
python3 - "$work/results" "${workloads[@]}" <<'PY'
import math, statistics, sys
rows = {}
by_round = {}
for line in open(sys.argv[1]):
    round_, load, name, rps, p50, p99, errors, proxy_us, cpu1 = line.split()
    rows.setdefault((load, name), []).append(
        (float(rps), float(p50), float(p99), float(proxy_us), float(cpu1), int(errors)))
    by_round[(round_, load, name)] = float(rps)
print(f"{'':20} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs haproxy':>11} "
      f"{'p99 vs haproxy':>15} {'proxy us/req':>13} {'vs haproxy':>11} {'CPU 1 busy':>11}")
verdicts = []
for load in sys.argv[2:]:
    names = [n for n in ["direct", "phoenix", "haproxy", "nginx"] if (load, n) in rows]
    med = {n: tuple(statistics.median(v[i] for v in rows[(load, n)]) for i in range(5))
              + (sum(v[5] for v in rows[(load, n)]),) for n in names}
    h = med["haproxy"]
    for name in names:
        rps, p50, p99, proxy_us, cpu1, errors = med[name]
        p99_ratio = f"{'':15}" if math.isnan(p99) else f"{p99 / h[2]:14.2f}x"
        cost = f"{'':13} {'':11}" if name == "direct" else f"{proxy_us:13.1f} {proxy_us / h[3]:10.2f}x"
        print(f"{load + ' ' + name:20} {rps:11.0f} {p50:8.3f} {p99:8.3f} {errors:7d} {rps / h[0]:10.2f}x "
              f"{p99_ratio} {cost} {cpu1:10.0f}%")
    # Each round's phoenix/haproxy ratio, the two measured minutes apart, not a run apart.
    paired = sorted(by_round[(r, l, "phoenix")] / by_round[(r, l, "haproxy")]
                    for (r, l, n) in by_round if l == load and n == "haproxy")
    bound = " load-bound" if med["phoenix"][4] >= 97 else ""
    verdicts.append(f"{load} {med['phoenix'][0] / h[0]:.2f}x "
                    f"(rounds {statistics.median(paired):.2f}x, {paired[0]:.2f}-{paired[-1]:.2f}; "
                    f"CPU a request {med['phoenix'][3] / h[3]:.2f}x{bound})")
print("\nphoenix requests/s vs haproxy (target >= 1.0x), medians; in brackets the median and range of")
print("each round's own ratio, and phoenix's CPU time a request against haproxy's (lower is better;")
print("load-bound: CPU 1, the load tool's and the backends', was at least 97 % busy):")
print("\n".join("  " + v for v in verdicts))
PY
