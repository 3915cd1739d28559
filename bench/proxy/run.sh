#!/usr/bin/env bash
# bench/proxy: Phoenix's proxy against HAProxy and nginx on the same work, in one run.
#
# Three nginx backends answer on loopback. Each proxy in turn gets CPU 0 alone and one thread
# (HAProxy nbthread 1, nginx worker_processes 1, phoenix proxy --threads 1); the load tool and
# the backends share CPU 1. The direct row is the load tool straight to one backend. All three
# proxies do the same work: keep-alive to the backends, round-robin, and the headers Phoenix
# always adds (X-Forwarded-For, X-Forwarded-Proto when absent, and Via both ways).
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
shapes=(small large new-conn 2000-conns h2c)
[ ${#workloads[@]} -gt 0 ] || workloads=("${shapes[@]}")
for load in "${workloads[@]}"; do
    [[ " ${shapes[*]} " == *" $load "* ]] || { echo "bench/proxy/run.sh: no shape \"$load\" (shapes: ${shapes[*]})" >&2; exit 2; }
done
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
    # The backends share CPU 1 with the load tool, so they serve as cheaply as nginx can
    # (the 64 KiB file by sendfile from a cached descriptor): every cycle they save goes
    # to the load tool, and less of each row measures CPU 1 instead of the proxy.
    sendfile on;
    open_file_cache max=16;
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
    # The headers Phoenix adds besides X-Forwarded-For (its fixed policy), so both do the
    # same work on every request and response.
    http-request set-header X-Forwarded-Proto http unless { req.hdr(x-forwarded-proto) -m found }
    http-request add-header Via "1.1 haproxy"
    http-response add-header Via "1.1 haproxy"
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
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header Via "1.1 nginx";
            add_header Via "1.1 nginx";
        }
    }
}
CONF

taskset -c 1 nginx -c "$work/backends.conf" -p "$work" & pids+=($!)
wait_port $b1

# measure WORKLOAD PORT: prints "requests/s p50_ms p99_ms errors proxy_us_per_request
# cpu1_busy_percent" for one workload shape (see with_cpu in bench/lib.sh).
measure() { with_cpu run_load "$@"; }

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
for round in $(seq "$rounds"); do
    for load in "${workloads[@]}"; do
        export BENCH_LABEL="round $round, $load, direct"
        [ "$load" = h2c ] || echo "$round $load direct $(measure "$load" $b1)" >> "$work/results"
    done
    for name in $(in_turn "$round" phoenix haproxy nginx); do
        start_proxy $name
        for load in "${workloads[@]}"; do
            # Phoenix tells h2c from HTTP/1.1 by the first bytes; the others need a port for it.
            p=$port
            [ "$load" = h2c ] && [ $name != phoenix ] && p=$h2port
            export BENCH_LABEL="round $round, $load, $name"
            echo "$round $load $name $(measure "$load" $p)" >> "$work/results"
        done
        stop_proxy
    done
done
python3 bench/proxy/summary.py "$work/results" "${workloads[@]}"
