#!/usr/bin/env bash
# The one command for newcomers: builds Stevedore and runs the whole fleet in
# one process on its embedded defaults (an SQLite file, no service, no API
# key), then submits a demo job and prints how it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin stevedore
exec target/release/stevedore dev --demo "$@"
