#!/usr/bin/env bash
# Makes sure a local PostgreSQL 15 runs (no systemd needed) with the role and
# database the coordinator and its tests use, then prints the database URL on
# stdout (everything else goes to stderr). Run as root; safe to run again.
set -euo pipefail

PG_VERSION=15
PG_CLUSTER=main
PG_PORT=5432
PG_BIN=/usr/lib/postgresql/$PG_VERSION/bin
PG_DATA=/var/lib/postgresql/$PG_VERSION/$PG_CLUSTER
ROLE=ramsnap
PASSWORD=ramsnap
DATABASE=ramsnap
URL="postgres://$ROLE:$PASSWORD@127.0.0.1:$PG_PORT/$DATABASE"

log() { echo "postgres.sh: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi

# Two runs at once (parallel CI steps) must not race each other. The server
# is started with fd 9 closed, or it would hold the lock for its lifetime.
exec 9>/tmp/ramsnap-postgres-setup.lock
flock 9

if [ ! -x "$PG_BIN/postgres" ]; then
    log "installing PostgreSQL $PG_VERSION"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    # Debian 12's "postgresql" is version 15. Its postinst may fail to start
    # the server without an init system; this script starts it below.
    apt-get install -y --no-install-recommends postgresql >&2
fi

as_postgres() { (cd /tmp && runuser -u postgres -- "$@"); }

is_running() { as_postgres "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1; }

if command -v pg_ctlcluster >/dev/null; then
    # The Debian way: the packaged cluster, with its config in /etc/postgresql.
    if [ ! -f "/etc/postgresql/$PG_VERSION/$PG_CLUSTER/postgresql.conf" ]; then
        log "creating cluster $PG_VERSION/$PG_CLUSTER"
        pg_createcluster --port "$PG_PORT" "$PG_VERSION" "$PG_CLUSTER" >&2
    fi
    if ! is_running; then
        log "starting cluster $PG_VERSION/$PG_CLUSTER"
        mkdir -p /var/run/postgresql
        chown postgres:postgres /var/run/postgresql
        pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start >&2 9>&-
    fi
else
    # No Debian wrapper scripts: a plain initdb cluster.
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        log "initialising $PG_DATA"
        mkdir -p "$PG_DATA"
        chown -R postgres:postgres "$(dirname "$PG_DATA")"
        as_postgres "$PG_BIN/initdb" -D "$PG_DATA" --auth-local=peer --auth-host=scram-sha-256 >&2
    fi
    if ! is_running; then
        log "starting $PG_DATA"
        mkdir -p /var/run/postgresql
        chown postgres:postgres /var/run/postgresql
        as_postgres "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_DATA/server.log" \
            -o "-p $PG_PORT -k /var/run/postgresql -c listen_addresses=127.0.0.1" >&2 9>&-
    fi
fi

for _ in $(seq 1 60); do
    if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
        break
    fi
    sleep 1
done
if ! "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    log "PostgreSQL does not answer on 127.0.0.1:$PG_PORT"
    exit 1
fi

psql_admin() {
    as_postgres "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -p "$PG_PORT" -d postgres "$@"
}

# Superuser, because the tests create and drop a database each.
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" = 1 ]; then
    psql_admin -c "ALTER ROLE $ROLE WITH LOGIN SUPERUSER PASSWORD '$PASSWORD'" >&2
else
    log "creating role $ROLE"
    psql_admin -c "CREATE ROLE $ROLE WITH LOGIN SUPERUSER PASSWORD '$PASSWORD'" >&2
fi

if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]; then
    log "creating database $DATABASE"
    psql_admin -c "CREATE DATABASE $DATABASE OWNER $ROLE" >&2
fi

# Check the URL itself works: password authentication over TCP.
PGPASSWORD=$PASSWORD "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$URL" -tAc "SELECT 1" >/dev/null

echo "$URL"
