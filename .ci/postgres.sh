#!/usr/bin/env bash
# Starts Debian's PostgreSQL cluster on 127.0.0.1:5432 (creating it if the
# package left none) and makes sure the role `kiln` (password `kiln`, may
# CREATE DATABASE) exists: what the integration suite's PostgreSQL build
# (`it_postgres`) and `kiln bench coordinator --db postgres` connect with.
# Idempotent; run as root (it switches to the postgres user).
set -euo pipefail
ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | grep -q .; then
  pg_createcluster "$ver" main >/dev/null
fi
read -r cver cname _ <<<"$(pg_lsclusters -h | head -1)"
if ! pg_lsclusters -h | head -1 | grep -q online; then
  pg_ctlcluster "$cver" "$cname" start
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 1
done
pg_isready -h 127.0.0.1 -p 5432
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -c "DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kiln') THEN
    CREATE ROLE kiln LOGIN PASSWORD 'kiln' CREATEDB;
  END IF; END \$\$;"
echo "PostgreSQL $cver/$cname up on 127.0.0.1:5432 (role kiln)"
