#!/usr/bin/env bash
# Restores an archive made by scripts/backup.sh into DATABASE_URL: checks
# the archive against its .sha256 first (and refuses without one), creates
# the database when it does not exist, and refuses a database that already
# holds the fleet's tables unless --clean is given. One transaction: a
# failed restore leaves nothing half-done. Stop every role first; start them
# again afterwards (the dispatcher re-sends queued jobs to the brokers).
#
# Usage: DATABASE_URL=postgres://... scripts/restore.sh [--clean] ARCHIVE
set -euo pipefail

clean=()
if [[ ${1:-} == --clean ]]; then
  clean=(--clean --if-exists)
  shift
fi
archive=${1:?usage: scripts/restore.sh [--clean] ARCHIVE}
: "${DATABASE_URL:?set DATABASE_URL to the database to restore into}"
[[ -f $archive ]] || { echo "restore: no archive at $archive" >&2; exit 2; }
sum="$archive.sha256"
[[ -f $sum ]] || { echo "restore: no checksum at $sum; refusing an unverified archive" >&2; exit 2; }
# The hash alone is compared, so a renamed or copied archive still checks.
expected=$(cut -d' ' -f1 "$sum")
actual=$(sha256sum <"$archive" | cut -d' ' -f1)
if [[ $expected != "$actual" ]]; then
  echo "restore: $archive does not match $sum; refusing a damaged archive" >&2
  exit 3
fi
pg_restore --list "$archive" >/dev/null

base=${DATABASE_URL%%\?*}
db=${base##*/}
query=${DATABASE_URL#"$base"}
if [[ -z $db || ! $db =~ ^[A-Za-z0-9_]+$ ]]; then
  echo "restore: the database name in DATABASE_URL must be letters, digits and _" >&2
  exit 2
fi
admin="${base%/*}/postgres$query"
exists=$(psql "$admin" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")
if [[ $exists != 1 ]]; then
  psql "$admin" -qc "CREATE DATABASE $db"
elif [[ ${#clean[@]} -eq 0 ]] &&
  [[ $(psql "$DATABASE_URL" -tAc "SELECT to_regclass('public.jobs') IS NOT NULL") == t ]]; then
  echo "restore: $db already holds a fleet; pass --clean to replace it" >&2
  exit 4
fi

pg_restore --no-owner --no-privileges --exit-on-error --single-transaction \
  "${clean[@]}" --dbname="$DATABASE_URL" "$archive"
psql "$DATABASE_URL" -tAc "SELECT status || ' ' || count(*) FROM jobs GROUP BY status ORDER BY status" |
  sed 's/^/restored jobs: /'
