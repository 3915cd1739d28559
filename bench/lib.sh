# Helpers shared by the benchmark scripts.

# need COMMAND PACKAGE: installs PACKAGE from Debian's archive when COMMAND is missing.
need() {
    command -v "$1" >/dev/null || { apt-get update -q && apt-get install -y -q "$2"; }
}

# wait_port PORT: waits (5 s at most) until something listens on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}

# wrk_measure URL [WRK ARGS...]: wrk on CPU 1 with $connections connections for $seconds
# seconds; prints "requests/s p50_ms p99_ms errors".
wrk_measure() {
    local url=$1 out
    shift
    out=$(taskset -c 1 wrk -t1 -c"$connections" -d"${seconds}s" --latency "$@" "$url")
    python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
if "Requests/sec" not in out or not re.search(r"^\s+99%\s+[\d.]", out, re.M):
    sys.exit(f"wrk gave no usable result:\n{out}")
def ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        sys.exit(f"wrk printed a latency of {v!r}:\n{out}")
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[m.group(2)]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errors += int(m.group(1)) if m else 0
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {errors}")
PY
}

# h2load_measure URL: h2load on CPU 1 for $seconds seconds; prints "requests/s - - errors"
# (h2load reports no percentiles).
h2load_measure() {
    local out
    out=$(taskset -c 1 h2load -c 20 -m 10 -D "$seconds" "$1" 2>&1)
    python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
r = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
if not m or not r:
    sys.exit(f"h2load gave no usable result:\n{out}")
s = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
errors = sum(int(n) for n in r.groups()) + (sum(int(n) for n in s.groups()) if s else 0)
print(f"{float(m.group(1)):.0f} nan nan {errors}")
PY
}
