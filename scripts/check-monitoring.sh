#!/usr/bin/env bash
# Checks monitoring/ without a running fleet: the Prometheus config and rules
# are valid, every alert's promtool unit tests pass, and every alert has a
# unit test and a runbook page. Installs promtool (Debian's `prometheus`)
# when missing. Takes about a second once promtool is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
  # --no-install-recommends: promtool alone, not the exporters it suggests.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

p=monitoring/prometheus
promtool check config "$p/prometheus.yml"
promtool check rules "$p"/rules/*.yml
promtool test rules "$p"/tests/*.yml

missing=0
for alert in $(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' "$p"/rules/*.yml); do
  if ! grep -q "alertname: $alert\$" "$p"/tests/*.yml; then
    echo "alert $alert has no promtool unit test in $p/tests/" >&2
    missing=1
  fi
  if [ ! -f "docs/runbooks/$alert.md" ]; then
    echo "alert $alert has no runbook docs/runbooks/$alert.md" >&2
    missing=1
  fi
done
exit "$missing"
