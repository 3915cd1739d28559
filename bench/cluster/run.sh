#!/usr/bin/env bash
# bench/cluster: the controller's real logic (placement rounds, rollout rounds, fenced etcd
# writes: crates/fleet/examples/cluster_bench.rs) against simulated hosts and a real etcd, on
# two shapes: issue 17's (1,000 hosts, 10 roles of 1,000 instances, 100 hosts failing) and
# Kubernetes' documented limits (5,000 nodes, 150,000 pods: 30 roles of 5,000, 500 failing).
# Simulated hosts are records in etcd and the reports they would write; no instance runs, so
# "placed and started" means the boot phase is written and every host can begin.
#
# Published figures to compare with: Nomad's C1M (HashiCorp, 2016) scheduled 1,000,000
# containers on 5,000 hosts in under 5 minutes (about 3,300 placements/s); C2M (2020) ran
# 2,000,000 containers on 6,100 hosts in 22 minutes (about 1,500/s, containers started
# included). Kubernetes supports at most 5,000 nodes, 150,000 pods and 110 pods a node.
#
# Usage: bench/cluster/run.sh [ETCD_MEMBERS]   (default 3; needs etcd-server)
set -euo pipefail
cd "$(dirname "$0")/../.."
members=${1:-3}
. bench/lib.sh
need etcd etcd-server

cargo build --release -p phoenix-fleet --example cluster_bench --quiet
bench=$PWD/target/release/examples/cluster_bench

rate() { # instances milliseconds -> placements per second
    awk -v n="$1" -v ms="$2" 'BEGIN { printf "%.0f", n * 1000 / (ms > 0 ? ms : 1) }'
}

for shape in "1000 10 1000 100" "5000 30 5000 500"; do
    set -- $shape
    echo "== $1 hosts, $2 roles of $3 instances, $4 hosts failing, $members etcd members"
    out=$("$bench" "$1" "$2" "$3" "$4" "$members")
    echo "$out"
    instances=$(( $2 * $3 ))
    ms=$(echo "$out" | sed -n 's/^first placement: .* in \([0-9]*\) ms.*/\1/p')
    per_s=$(rate "$instances" "$ms")
    echo "placements/s: $per_s; against Nomad C1M's ~3,300/s: $(awk -v a="$per_s" 'BEGIN { printf "%.2fx", a / 3300 }')"
done
