#!/usr/bin/env bash
# Browser scraping, Playwright against Stevedore, one page at a time and
# four at a time, in one run (the machine is noisy: only figures taken
# together compare). Both load the Moodle fixture from loopback in the same
# Chromium ($CHROME, default /usr/bin/chromium) with a fresh context per
# page; Playwright's runs without Stevedore's proxy, sandboxing and
# namespace, Stevedore's with all of them.
#   scripts/compare/scrape.sh [PAGES] [ROUNDS]
# STEVEDORE (default target/release/stevedore, else target/debug/stevedore)
# is the binary measured; STEVEDORE_BASE, if set, is measured too (an older
# build, for before/after), with --concurrency given one at a time so a
# build from before `--concurrency 1,4` works.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
pages="${1:-100}"
rounds="${2:-1}"
bin="${STEVEDORE:-}"
if [ -z "$bin" ]; then
  bin="$root/target/release/stevedore"
  [ -x "$bin" ] || bin="$root/target/debug/stevedore"
fi
(cd "$here" && { [ -d node_modules/playwright-core ] || npm install --silent --no-audit --no-fund >/dev/null; })
export STEVEDORE_LOG="${STEVEDORE_LOG:-warn}"
for round in $(seq "$rounds"); do
  echo "== round $round: $pages pages per figure"
  (cd "$here" && node playwright-scrape.mjs "$pages" 1,4)
  "$bin" bench-scrape --modes browser --pages "$pages" --concurrency 1,4 | sed 's/^browser  /stevedore/'
  if [ -n "${STEVEDORE_BASE:-}" ]; then
    for c in 1 4; do
      "$STEVEDORE_BASE" bench-scrape --modes browser --pages "$pages" --concurrency "$c" | sed 's/^browser  /baseline /'
    done
  fi
done
