#!/usr/bin/env bash
# bench/logs: log capture under a flood, side by side with rsyslog, in one run.
#
# 1. Baseline: 4 `flood` writers (crates/observe/examples/flood.rs, one write(2) a line, as a
#    line-buffered application writes) to /dev/null; each reports its own lines/s.
# 2. Phoenix: a role of 4 instances of the same writer (process driver, host network), captured
#    by `phoenix up` into its log store. Captured lines/s = all lines / (last `flood end` read
#    - first `flood start` read), from the store's own timestamps; the writers' lines/s give the
#    slowdown against the baseline; drops from /metrics; bytes a line on disk.
# 3. rsyslog: the same 4 writers send each line as a datagram to rsyslogd's imuxsock (as
#    syslog(3) does; rate limiting off), written to a file by omfile; lines/s until the file
#    holds every line, and the writers' slowdown.
# 4. `phoenix logs ROLE --grep` over GREP_GIB GiB of stored log text (a longer flood), timed.
#
# Targets (issue 16): >= 500,000 lines/s captured, writers slowed < 10 %, grep of 1 GiB < 2 s.
# Usage: bench/logs/run.sh [LINES_PER_WRITER] [GREP_GIB]   (as root; defaults 1000000 1)
set -euo pipefail
cd "$(dirname "$0")/../.."
lines=${1:-1000000}
grep_gib=${2:-1}
writers=4
. bench/lib.sh
need rsyslogd rsyslog

cargo build --release -p phoenix -p phoenix-observe --example flood --quiet
cargo build --release -p phoenix --quiet
phoenix=$PWD/target/release/phoenix
flood=$PWD/target/release/examples/flood
work=$(mktemp -d)
up=""
rsyslog=""
cleanup() {
    [ -n "$up" ] && kill -INT "$up" 2>/dev/null && wait "$up" 2>/dev/null
    [ -n "$rsyslog" ] && kill "$rsyslog" 2>/dev/null && wait "$rsyslog" 2>/dev/null
    rm -rf "$work"
    return 0
}
trap cleanup EXIT

# The mean of the writers' own lines/s in FILE (lines "flood end N lines in MS ms (R lines/s)").
writer_rate() {
    grep -o '([0-9]* lines/s)' "$1" | tr -d '(' | awk '{ s += $1; n++ } END { printf "%.0f", s / n }'
}

echo "== baseline: $writers writers x $lines lines to /dev/null"
: > "$work/baseline.txt"
for _ in $(seq "$writers"); do
    "$flood" "$lines" > /dev/null 2>> "$work/baseline.txt" &
done
wait
base=$(writer_rate "$work/baseline.txt")
echo "   writer: $base lines/s each"

echo "== phoenix: a role of $writers instances, captured"
fleet() { # lines
    mkdir -p "$work/ctx"
    cp "$flood" "$work/ctx/flood"
    cat > "$work/phoenix.toml" <<TOML
[image.flood]
from = "scratch"
context = "ctx"
copy = [{ src = "flood", dst = "/bin/flood", libraries = true }]
entrypoint = ["/bin/flood", "$1"]

[role.bench]
image = "flood"
instances = $writers
listen = "127.0.0.1:0"
driver = "process"
network = "host"
allow_root = true

[role.bench.proxy]
mode = "tcp"

[role.bench.health]
interval = "1s"
TOML
}
run_phoenix() { # lines state
    fleet "$1"
    (cd "$work" && exec "$phoenix" --state "$2" up > "$work/up.log" 2>&1) &
    up=$!
    # Done when every instance said `flood end` (on stdout or stderr: a line may be dropped).
    local deadline=$((SECONDS + 300))
    until [ "$(ended "$2")" -ge "$writers" ]; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "timed out"; tail "$work/up.log"; exit 1; }
        sleep 1
    done
    sleep 2
}
ended() { # state: how many instances said `flood end`
    "$phoenix" --state "$1" logs bench --grep '^flood end' --json 2>/dev/null |
        python3 -c 'import json, sys; print(len({json.loads(l).get("instance") for l in sys.stdin} - {None}))'
}
state=$work/state
run_phoenix "$lines" "$state"
dropped=$(curl -s --unix-socket "$state/api.sock" http://phoenix/metrics | awk '/^phoenix_logs_dropped_total\{role="bench"\}/ { print $2 }')
kill -INT "$up"; wait "$up" || true; up=""
# Captured lines/s: the lines stored, over the time from the first `flood start` read to the
# last line read (the store's own timestamps).
read -r stored_lines cap_secs cap_rate < <("$phoenix" --state "$state" logs bench --json | python3 -c '
import json, sys
from datetime import datetime
at = lambda r: datetime.strptime(r["at"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
first = last = None
count = 0
for l in sys.stdin:
    r = json.loads(l)
    count += 1
    if r["text"] == "flood start" and first is None:
        first = at(r)
    last = at(r)
print(count, f"{last - first:.2f}", f"{count / (last - first):.0f}")')
"$phoenix" --state "$state" logs bench --grep '^flood end' | sed 's/.*flood end/flood end/' | sort -u > "$work/captured.txt"
slowed=$(writer_rate "$work/captured.txt")
bytes=$(du -sb "$state/logs/store/bench" | cut -f1)
echo "   offered: $((writers * (lines + 2))) lines; stored $stored_lines, dropped ${dropped:-0} (counted)"
echo "   captured: $cap_rate lines/s ($stored_lines lines in ${cap_secs}s)"
echo "   writer: $slowed lines/s each ($(python3 -c "print(f'{(1 - $slowed / $base) * 100:.1f}')")% slower than /dev/null)"
echo "   store: $(python3 -c "print(f'{$bytes / $stored_lines:.1f}')") bytes a line on disk ($bytes bytes)"

echo "== rsyslog: the same writers to imuxsock, omfile"
mkdir -p "$work/rsyslog"
cat > "$work/rsyslog/rsyslog.conf" <<CONF
global(workDirectory="$work/rsyslog")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="$work/rsyslog/log.sock" RateLimit.Interval="0" CreatePath="on")
template(name="line" type="string" string="%msg%\n")
action(type="omfile" file="$work/rsyslog/out.log" template="line")
CONF
rsyslogd -n -f "$work/rsyslog/rsyslog.conf" -i "$work/rsyslog/pid" &
rsyslog=$!
until [ -S "$work/rsyslog/log.sock" ]; do sleep 0.1; done
: > "$work/rsyslog.txt"
t0=$(date +%s.%N)
for _ in $(seq "$writers"); do
    "$flood" "$lines" --syslog "$work/rsyslog/log.sock" 2>> "$work/rsyslog.txt" &
done
wait $(jobs -p | grep -v "^$rsyslog$") 2>/dev/null || true
total=$((writers * (lines + 2)))
until [ "$(wc -l < "$work/rsyslog/out.log")" -ge "$total" ]; do sleep 0.05; done
t1=$(date +%s.%N)
kill "$rsyslog"; wait "$rsyslog" 2>/dev/null || true; rsyslog=""
rs_rate=$(python3 -c "print(f'{$writers * $lines / ($t1 - $t0):.0f}')")
rs_writer=$(writer_rate "$work/rsyslog.txt")
rs_bytes=$(stat -c %s "$work/rsyslog/out.log")
echo "   written: $rs_rate lines/s"
echo "   writer: $rs_writer lines/s each ($(python3 -c "print(f'{(1 - $rs_writer / $base) * 100:.1f}')")% slower than /dev/null)"
echo "   file: $(python3 -c "print(f'{$rs_bytes / $total:.1f}')") bytes a line (plain text, no time or source)"

echo "== grep: $grep_gib GiB of stored log text"
# Each stored line is about 190 bytes of JSON; writers offer more than is captured (the rest
# is dropped and counted): 2.5 times the lines of GREP_GIB GiB.
big=$(python3 -c "print(int($grep_gib * 2**30 / 190 / $writers * 2.5) + 1)")
state2=$work/state2
run_phoenix "$big" "$state2"
kill -INT "$up"; wait "$up" || true; up=""
raw=$("$phoenix" --state "$state2" logs bench --json -n 1 > /dev/null; python3 - "$state2/logs/store/bench" <<'PY'
import gzip, os, sys
total = 0
for name in os.listdir(sys.argv[1]):
    path = os.path.join(sys.argv[1], name)
    if name.endswith(".jsonl.gz"):
        with gzip.open(path) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    elif name.endswith(".jsonl"):
        total += os.path.getsize(path)
print(total)
PY
)
needle="line $((big / 2)) "
for run in 1 2 3; do
    t0=$(date +%s.%N)
    found=$("$phoenix" --state "$state2" logs bench --grep "$needle" | wc -l)
    t1=$(date +%s.%N)
    echo "   run $run: $(python3 -c "print(f'{$t1 - $t0:.2f}')") s over $(python3 -c "print(f'{$raw / 2**30:.2f}')") GiB, $found lines found (expected $writers)"
done

echo
echo "== summary"
python3 - <<PY
cap, rs = $cap_rate, $rs_rate
print(f"captured {cap} lines/s vs rsyslog {rs} lines/s: {cap / rs:.2f}x")
print(f"writer slowdown: phoenix {(1 - $slowed / $base) * 100:.1f}%, rsyslog {(1 - $rs_writer / $base) * 100:.1f}%")
PY
