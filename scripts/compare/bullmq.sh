#!/usr/bin/env bash
# BullMQ on this machine's Redis, for a ratio against scripts/bench.sh.
#   scripts/compare/bullmq.sh [JOBS] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules/bullmq ] || npm install --silent --no-audit --no-fund >/dev/null
node bullmq-bench.mjs "${1:-20000}" "${2:-64}"
