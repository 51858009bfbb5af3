#!/bin/sh
# The entrypoint of deploy/cluster/images/postgres: the first start makes the database, then
# every start runs the command (postgres ...) in its place.
#
# First start, when $PGDATA holds no cluster: initdb into $PGDATA.new, with the superuser
# postgres's password from $POSTGRES_PASSWORD_FILE, password (scram-sha-256) authentication
# over TCP and peer authentication on the Unix socket; a server on the socket only (nothing on
# the network sees a half-made database) creates $POSTGRES_DB and runs
# /docker-entrypoint-initdb.d/*.sql in it, stops, and only then is $PGDATA.new renamed
# $PGDATA.  A first start that fails leaves no $PGDATA: the next start does it all again.
set -eu
log() { echo "postgres-entrypoint: $*" >&2; }

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD_FILE:?must name the superuser password file}"
    [ -s "$POSTGRES_PASSWORD_FILE" ] || { log "$POSTGRES_PASSWORD_FILE is missing or empty"; exit 1; }
    db=${POSTGRES_DB:-postgres}
    new="$PGDATA.new"
    rm -rf "$new"
    log "first start: initdb into $PGDATA"
    initdb --pgdata="$new" --username=postgres --pwfile="$POSTGRES_PASSWORD_FILE" \
        --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    pg_ctl --pgdata="$new" --options="-c listen_addresses=''" --wait --timeout=60 --silent start
    if [ "$db" != postgres ]; then
        echo 'CREATE DATABASE :"db";' | psql --quiet --no-psqlrc -v ON_ERROR_STOP=1 \
            --username=postgres --dbname=postgres --set=db="$db"
    fi
    for script in /docker-entrypoint-initdb.d/*.sql; do
        [ -f "$script" ] || continue
        log "running $script"
        psql --quiet --no-psqlrc -v ON_ERROR_STOP=1 --username=postgres --dbname="$db" --file="$script"
    done
    pg_ctl --pgdata="$new" --mode=fast --wait --timeout=60 --silent stop
    mv "$new" "$PGDATA"
    log "first start: done"
fi
exec "$@"
