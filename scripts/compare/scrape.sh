#!/usr/bin/env bash
# Playwright with the same Chromium, for a ratio against
# `stevedore bench-scrape` (run both in one go, the machine is noisy).
#   scripts/compare/scrape.sh [PAGES] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules/playwright-core ] || npm install --silent --no-audit --no-fund >/dev/null
node playwright-scrape.mjs "${1:-100}" "${2:-4}"
