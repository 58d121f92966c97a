#!/usr/bin/env bash
# Makes sure the services the tests and the production roles use are there:
# PostgreSQL, Redis and RabbitMQ at DATABASE_URL, REDIS_URL and AMQP_URL
# (default: the local ones). A local one that is down is started; a remote
# one must already answer. The server packages are installed either way,
# because the fault drills start private instances of each (tests/drills.rs).
# Also installs the tools the suite needs: Chromium at $CHROME, psql and
# pg_dump, a compose CLI, node and python venv for scripts/check-deploy.sh.
# Works as root or as a user with sudo (used for apt-get and for starting
# system services only). Idempotent.
set -euo pipefail

DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
CHROME=${CHROME:-/usr/bin/chromium}

as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)

# "host port" of scheme://[user[:pass]@]host[:port][/...], $2 when no port.
hostport() {
  local rest=${1#*://}
  rest=${rest%%/*}
  rest=${rest##*@}
  local host=${rest%:*} port=${rest##*:}
  [ "$host" = "$rest" ] && port=$2
  echo "${host:-127.0.0.1} $port"
}
is_local() { case $1 in 127.0.0.1 | localhost | ::1 | '[::1]') return 0 ;; *) return 1 ;; esac; }
up() { timeout 2 bash -c "</dev/tcp/$1/$2" 2>/dev/null; }
wait_up() {
  for _ in $(seq 1 60); do up "$1" "$2" && return 0; sleep 1; done
  echo "$3 did not come up on $1:$2" >&2
  return 1
}

read -r pg_host pg_port <<<"$(hostport "$DATABASE_URL" 5432)"
read -r redis_host redis_port <<<"$(hostport "$REDIS_URL" 6379)"
read -r amqp_host amqp_port <<<"$(hostport "$AMQP_URL" 5672)"

need_apt=()
# Services to start here: local ones that are down (a remote one is not ours).
start=()
for svc in postgres redis rabbitmq; do
  case $svc in
    postgres) h=$pg_host p=$pg_port url_var=DATABASE_URL ;;
    redis) h=$redis_host p=$redis_port url_var=REDIS_URL ;;
    rabbitmq) h=$amqp_host p=$amqp_port url_var=AMQP_URL ;;
  esac
  up "$h" "$p" && continue
  if ! is_local "$h"; then
    echo "$svc is not reachable at $h:$p ($url_var)" >&2
    exit 1
  fi
  start+=("$svc")
done
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_apt+=(postgresql)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v rabbitmq-server >/dev/null || need_apt+=(rabbitmq-server)
command -v psql >/dev/null && command -v pg_dump >/dev/null || need_apt+=(postgresql-client)
[ -x "$CHROME" ] || need_apt+=(chromium)
# The compose files are validated by the tests; without the v2 plugin, use
# Debian's docker-compose.
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v npm >/dev/null || need_apt+=(npm)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  # Packaged daemons must not start on install: they would take the ports
  # of the services named by URL (CI's containers); this script starts
  # what is needed itself.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee $policy >/dev/null
    "${as_root[@]}" chmod 755 $policy
    trap '"${as_root[@]}" rm -f '$policy EXIT
  fi
  "${as_root[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need_apt[@]}" >/dev/null
fi
# The drills call initdb and pg_ctl by name; Debian keeps them off PATH.
for tool in initdb pg_ctl; do
  command -v $tool >/dev/null && continue
  found=$(compgen -G "/usr/lib/postgresql/*/bin/$tool" | sort -V | tail -1)
  "${as_root[@]}" ln -sf "$found" /usr/local/bin/$tool
done

for svc in "${start[@]}"; do
  case $svc in
    postgres)
      "${as_root[@]}" pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
      wait_up "$pg_host" "$pg_port" PostgreSQL
      ;;
    redis)
      redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no
      wait_up "$redis_host" "$redis_port" Redis
      ;;
    rabbitmq)
      "${as_root[@]}" rabbitmq-server -detached
      wait_up "$amqp_host" "$amqp_port" RabbitMQ
      ;;
  esac
done

# The tests connect to the database `test` as their admin connection.
psql "$DATABASE_URL" -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 ||
  psql "$DATABASE_URL" -qc "CREATE DATABASE test"
