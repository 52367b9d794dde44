#!/usr/bin/env bash
# Every benchmark, one after the other, each printing its figures next to the baselines it
# measured in the same run (README "Benchmarks"). Installs what it needs like tests/run.sh.
# The output is also kept in bench/out/ (not tracked); copy a full run into bench/RESULTS.md.
#   bench/run.sh [--quick]        --quick: smaller samples, for a smoke run
set -euo pipefail
source "$(dirname "$0")/../tests/setup.sh"

readings=200000 backlog=100000 seconds=15 summary=50000000 partitions=50000000
nodes=1000,5000,10000 steady=60
if [ "${1:-}" = "--quick" ]; then
    readings=20000 backlog=20000 seconds=5 summary=2000000 partitions=2000000
    nodes=500 steady=20
fi
mkdir -p bench/out
out="bench/out/$(date -u +%Y%m%dT%H%M%SZ).txt"
{
    echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    "$VENV/bin/python" -u -m bench.drain --readings "$readings"
    "$VENV/bin/python" -u -m bench.statement --readings "$backlog"
    "$VENV/bin/python" -u -m bench.edge --backlog "$backlog" --seconds "$seconds"
    "$VENV/bin/python" -u -m bench.e2e --seconds "$seconds"
    "$VENV/bin/python" -u -m bench.capacity --levels "$nodes" --seconds "$steady"
    "$VENV/bin/python" -u -m bench.summary --readings "$summary"
    "$VENV/bin/python" -u -m bench.partitions --readings "$partitions"
} 2>&1 | tee "$out"
echo "kept in $out"
