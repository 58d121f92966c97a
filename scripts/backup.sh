#!/usr/bin/env bash
# Backs up the fleet's Postgres database: a pg_dump custom-format archive
# (compressed, restorable table by table, consistent while the fleet runs),
# its SHA-256 beside it, and retention of the newest BACKUP_KEEP archives of
# that database. Prints the archive's path. Redis and RabbitMQ need no
# backup: Postgres holds every job and the dispatcher re-sends what a broker
# lacks. scripts/restore.sh is the way back; docs/operations.md the drill.
#
# Usage: DATABASE_URL=postgres://... scripts/backup.sh [DIR]
# Env:   DATABASE_URL  the database to dump (required)
#        BACKUP_DIR    where archives go when DIR is not given (default backups/)
#        BACKUP_KEEP   how many archives of this database to keep (default 14)
set -euo pipefail

: "${DATABASE_URL:?set DATABASE_URL to the database to back up}"
dir=${1:-${BACKUP_DIR:-backups}}
keep=${BACKUP_KEEP:-14}
if ! [[ $keep =~ ^[1-9][0-9]*$ ]]; then
  echo "backup: BACKUP_KEEP must be a whole number of at least 1, not '$keep'" >&2
  exit 2
fi

db=${DATABASE_URL##*/}
db=${db%%\?*}
if [[ -z $db || ! $db =~ ^[A-Za-z0-9_.-]+$ ]]; then
  echo "backup: cannot tell the database name from DATABASE_URL" >&2
  exit 2
fi
mkdir -p "$dir"
# Nanoseconds keep two backups in one second apart; the name sorts by time.
stamp=$(date -u +%Y%m%dT%H%M%S.%NZ)
name="stevedore-$db-$stamp.dump"
tmp="$dir/.$name.partial"
trap 'rm -f "$tmp"' EXIT

# The archive only gets its final name once complete, so a crash never
# leaves a truncated file that looks like a backup.
pg_dump --format=custom --compress=6 --no-owner --no-privileges \
  --file="$tmp" "$DATABASE_URL"
(cd "$dir" && sha256sum ".$name.partial" | sed "s/\.$name\.partial\$/$name/" >"$name.sha256")
mv "$tmp" "$dir/$name"
trap - EXIT

# Retention: the newest $keep archives of this database, by name (= time).
mapfile -t old < <(find "$dir" -maxdepth 1 -name "stevedore-$db-*.dump" -printf '%f\n' | sort -r | tail -n +"$((keep + 1))")
for f in "${old[@]}"; do
  rm -f "$dir/$f" "$dir/$f.sha256"
done

echo "$dir/$name"
