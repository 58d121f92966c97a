#!/usr/bin/env bash
# Rerunnable end-to-end benchmark from the release build: starts a fleet
# (embedded dev mode, or Postgres + Redis with separate api and worker
# processes), runs `stevedore bench` against it, then stops it.
#   scripts/bench.sh dev|redis|amqp [JOBS] [WORKER_PROCESSES] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-redis} jobs=${2:-20000} procs=${3:-1} conc=${4:-64}
bin=target/release/stevedore
[ -x "$bin" ] || cargo build --release --bin stevedore
port=$((20000 + RANDOM % 20000))
tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
export STEVEDORE_LOG=warn
case "$mode" in
  dev)
    "$bin" dev --listen 127.0.0.1:$port --data-dir "$tmp" --concurrency "$conc" & pids+=($!) ;;
  redis|amqp)
    scripts/services.sh >/dev/null
    if [ "$mode" = amqp ]; then export STEVEDORE_BROKER=amqp STEVEDORE_AMQP_PREFIX=bench-$$; fi
    db=sdbench_$$
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db"
    trap 'cleanup; psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS '$db' WITH (FORCE)"' EXIT
    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db STEVEDORE_REDIS_PREFIX=bench-$$
    "$bin" migrate >/dev/null
    # Measured as deployed: with an API key on every request.
    export STEVEDORE_AUTH_SECRET="bench-secret-$$-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    STEVEDORE_API_KEY=$("$bin" keys create --tenant bench --scope submit --json |
      sed -E 's/.*"key":"([^"]+)".*/\1/')
    export STEVEDORE_API_KEY
    "$bin" api --listen 127.0.0.1:$port & pids+=($!)
    for _ in $(seq "$procs"); do "$bin" worker --pool probe --concurrency "$conc" & pids+=($!); done ;;
  *) echo "usage: $0 dev|redis|amqp [jobs] [worker processes] [concurrency]" >&2; exit 2 ;;
esac
for _ in $(seq 100); do curl -fs "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
"$bin" bench --url "http://127.0.0.1:$port" --jobs "$jobs"
