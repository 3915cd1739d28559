"""Summary of a bench/proxy run: medians per workload and proxy, ratios to HAProxy and nginx.

Usage: summary.py RESULTS WORKLOAD...

Each line of RESULTS is "round workload name requests/s p50_ms p99_ms errors proxy_us cpu1_busy"
(as bench/lib.sh's with_cpu prints them after the round, workload and name).
"""
import math
import statistics
import sys

NAMES = ["direct", "phoenix", "haproxy", "nginx"]
LOAD_BOUND = 97  # percent busy of CPU 1 (the load tool's and the backends') from which a row is load-bound


def read(path):
    rows, by_round = {}, {}
    for line in open(path):
        round_, load, name, rps, p50, p99, errors, proxy_us, cpu1 = line.split()
        rows.setdefault((load, name), []).append(
            (float(rps), float(p50), float(p99), float(proxy_us), float(cpu1), int(errors)))
        by_round[(round_, load, name)] = float(rps)
    return rows, by_round


def medians(runs):
    """Median of each figure over the rounds; errors are summed."""
    return tuple(statistics.median(run[i] for run in runs) for i in range(5)) + (
        sum(run[5] for run in runs),)


def main():
    rows, by_round = read(sys.argv[1])
    print(f"{'':22} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs haproxy':>11} "
          f"{'vs nginx':>9} {'p99 vs haproxy':>15} {'proxy us/req':>13} {'vs haproxy':>11} {'CPU 1 busy':>11}")
    verdicts = []
    for load in sys.argv[2:]:
        med = {name: medians(rows[(load, name)]) for name in NAMES if (load, name) in rows}
        h, n = med["haproxy"], med["nginx"]
        for name, (rps, p50, p99, proxy_us, cpu1, errors) in med.items():
            p99_ratio = f"{'':15}" if math.isnan(p99) else f"{p99 / h[2]:14.2f}x"
            cost = f"{'':13} {'':11}" if name == "direct" else f"{proxy_us:13.1f} {proxy_us / h[3]:10.2f}x"
            print(f"{load + ' ' + name:22} {rps:11.0f} {p50:8.3f} {p99:8.3f} {errors:7d} {rps / h[0]:10.2f}x "
                  f"{rps / n[0]:8.2f}x {p99_ratio} {cost} {cpu1:10.0f}%")
        # Each round's own phoenix/haproxy ratio: the two measured a minute apart, not a run apart.
        paired = sorted(by_round[(r, l, "phoenix")] / by_round[(r, l, "haproxy")]
                        for (r, l, name) in by_round if l == load and name == "haproxy")
        p = med["phoenix"]
        bound = ", load-bound" if p[4] >= LOAD_BOUND else ""
        verdicts.append(f"{load} {p[0] / h[0]:.2f}x (rounds {statistics.median(paired):.2f}x, "
                        f"{paired[0]:.2f}-{paired[-1]:.2f}; CPU a request {p[3] / h[3]:.2f}x{bound})")
    print("\nphoenix requests/s vs haproxy (target >= 1.0x), medians; in brackets the median and range of")
    print("each round's own ratio, and phoenix's CPU time a request against haproxy's (lower is better;")
    print(f"load-bound: CPU 1, the load tool's and the backends', was at least {LOAD_BOUND} % busy):")
    print("\n".join("  " + verdict for verdict in verdicts))


main()
