#!/usr/bin/env bash
# The whole test suite, as CI runs it: services up, formatting, lints, then
# every test of the workspace against the real services.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
# The analyze tests run the real local model.
scripts/fetch-model.sh >/dev/null
# tests/openapi.rs fuzzes the running API with schemathesis (PyPI).
python3 -c 'import schemathesis.cli' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/schemathesis/requirements.txt

# Test databases are dropped by each test; a test that failed leaves its own.
admin_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
psql "$admin_url" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'sdt\_%'" |
  while read -r db; do psql "$admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; done

scripts/check-monitoring.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
scripts/check-deploy.sh
cargo nextest run --workspace --no-fail-fast
