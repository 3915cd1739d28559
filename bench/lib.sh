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
if errors:  # say which kind, to stderr (stdout is the figures)
    import os
    print(f"wrk {os.environ.get('BENCH_LABEL', '')}: " + "; ".join(l.strip() for l in out.splitlines()
                              if "errors:" in l or "Non-2xx" in l), file=sys.stderr)
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
if errors:  # say which kind, to stderr (stdout is the figures)
    import os
    print(f"h2load {os.environ.get('BENCH_LABEL', '')}: {r.group(0)}; {s.group(0) if s else ''}", file=sys.stderr)
print(f"{float(m.group(1)):.0f} nan nan {errors}")
PY
}

# in_turn ROUND NAME...: the names, starting with a different one each round, so that no proxy
# always runs first (drift in the machine's speed over a run would otherwise favour one).
in_turn() {
    local round=$1
    shift
    local names=("$@") i
    for i in "${!names[@]}"; do
        echo "${names[$(( (i + round - 1) % ${#names[@]} ))]}"
    done
}

# cpu_times: "busy idle" jiffies of CPU 0, then of CPU 1 (from /proc/stat).
cpu_times() { awk '/^cpu[01] /{printf "%d %d ", $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }

# with_cpu MEASURE [ARGS...]: runs MEASURE (which prints "requests/s p50_ms p99_ms errors") and
# adds two figures: the proxy's CPU time a request in microseconds (CPU 0's busy time over the
# requests; the proxy runs there alone) and CPU 1's busy percent (the load tool's and the
# backends': when it is full, requests/s measures them as much as the proxy).
with_cpu() {
    local before after result
    before=$(cpu_times)
    result=$("$@")
    after=$(cpu_times)
    python3 - "$result" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import sys
result, before, after, hz = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4])
busy0, idle0, busy1, idle1 = (int(a) - int(b) for a, b in zip(after, before))
seconds = (busy1 + idle1) / hz
requests = float(result.split()[0]) * seconds
proxy_us = busy0 / hz * 1e6 / requests if requests else float("nan")
print(f"{result} {proxy_us:.1f} {100 * busy1 / (busy1 + idle1):.0f}")
PY
}
