#!/usr/bin/env bash
# bench/proxy/tls.sh: TLS termination, Phoenix against HAProxy and nginx, in one run, with the
# same certificate (ECDSA P-256, from `phoenix tls dev-cert`) and the same backends.
#
# Three workloads, each proxy alone on CPU 0 with one thread, the clients and the backends on
# CPU 1:
#   keep-alive   requests/s over $CONNECTIONS kept-alive TLS connections (TLS 1.3)
#   handshakes   a new TLS connection per request (`Connection: close`): full handshakes/s
#   h2           HTTP/2 over TLS (ALPN h2), h2load -c 20 -m 10 (needs nghttp2-client)
# Phoenix runs the edge listener's path (`phoenix proxy --tls-cert --tls-key`: rustls, then
# the role proxy); HAProxy `bind ... ssl crt`, nginx `listen ... ssl`, both with OpenSSL.
#
# Usage: bench/proxy/tls.sh [SECONDS] [CONNECTIONS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-10}
connections=${2:-50}
rounds=${3:-3}

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

"$phoenix" tls dev-cert --name localhost --out "$work" > /dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"

b1=18111 b2=18112 b3=18113 port=18110
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
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:$port ssl crt $work/haproxy.pem alpn h2,http/1.1
    # The headers Phoenix adds besides X-Forwarded-For (its fixed policy), so both do the
    # same work on every request and response.
    http-request set-header X-Forwarded-Proto https unless { req.hdr(x-forwarded-proto) -m found }
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
        listen 127.0.0.1:$port ssl http2;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
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

start_proxy() {
    case $1 in
        phoenix) taskset -c 0 "$phoenix" proxy --threads 1 --listen 127.0.0.1:$port \
            --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
            --backend 127.0.0.1:$b1 --backend 127.0.0.1:$b2 --backend 127.0.0.1:$b3 > "$work/phoenix.log" 2>&1 & ;;
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

url="https://localhost:$port/"
echo "TLS benchmark: wrk -c$connections for ${seconds}s, $rounds rounds (median), proxies on CPU 0 with one thread"
echo "versions: $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), phoenix $("$phoenix" --version | cut -d' ' -f2)"
: > "$work/results"
for round in $(seq "$rounds"); do
    for name in $(in_turn "$round" phoenix haproxy nginx); do
        start_proxy $name
        export BENCH_LABEL="round $round, keep-alive, $name"
        echo "$round keep-alive $name $(with_cpu wrk_measure "$url")" >> "$work/results"
        export BENCH_LABEL="round $round, handshakes, $name"
        echo "$round handshakes $name $(with_cpu wrk_measure "$url" -H 'Connection: close')" >> "$work/results"
        export BENCH_LABEL="round $round, h2, $name"
        echo "$round h2 $name $(with_cpu h2load_measure "$url")" >> "$work/results"
        stop_proxy
    done
done
python3 bench/proxy/summary.py "$work/results" keep-alive handshakes h2
