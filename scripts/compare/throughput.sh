#!/usr/bin/env bash
# BullMQ and Stevedore side by side in one run, the same no-op jobs at the
# same worker concurrencies, each Stevedore figure also as a ratio of
# BullMQ's at that concurrency (the machine is shared and noisy: compare
# ratios from one run, not absolutes across runs).
#   scripts/compare/throughput.sh [JOBS] [MODES] [CONCURRENCY...]
#   e.g. scripts/compare/throughput.sh 20000 "redis amqp dev" 64 256
# Uses the release build (scripts/bench.sh builds it if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs=${1:-20000}
modes=${2:-redis amqp dev}
shift 2 2>/dev/null || shift $#
concs=("$@")
[ ${#concs[@]} -gt 0 ] || concs=(64 256)
rate() { sed -nE "s/$1.*: ([0-9]+) jobs\/s.*/\1/p" | tail -1; }
printf '%-22s %6s %10s %8s %s\n' system conc "jobs/s" "x BullMQ" "database"
for c in "${concs[@]}"; do
  bull=$(scripts/compare/bullmq.sh "$jobs" "$c" | rate '^bullmq:')
  printf '%-22s %6s %10s %8s\n' "BullMQ (Redis)" "$c" "$bull" "1.00"
  for mode in $modes; do
    out=$(scripts/bench.sh "$mode" "$jobs" 1 "$c")
    s=$(rate '^end to end:' <<<"$out")
    db=$(sed -nE 's/^database: //p' <<<"$out")
    ratio=$(awk -v s="${s:-0}" -v b="${bull:-0}" 'BEGIN { if (b > 0) printf "%.2f", s / b; else print "-" }')
    printf '%-22s %6s %10s %8s %s\n' "Stevedore $mode" "$c" "${s:--}" "$ratio" "$db"
  done
done
