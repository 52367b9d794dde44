#!/bin/bash
# The official postgres image's entry point contract, as far as our compose file uses it:
#   - started as root: own the data directory, then step down to postgres (uid 999);
#   - an empty $PGDATA: initdb with POSTGRES_USER and POSTGRES_PASSWORD (required), a
#     `host all all all scram-sha-256` line, a socket-only server for setup, POSTGRES_DB
#     created, then each /docker-entrypoint-initdb.d file: *.sh run (if executable) or
#     sourced, *.sql fed to psql; then that server stops;
#   - then exec the command (postgres), which listens on every address.
set -Eeo pipefail

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
export POSTGRES_USER POSTGRES_DB

if [ "${1:0:1}" = - ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi

mkdir -p "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA" || :
if [ "$(id -u)" = 0 ]; then
    find "$PGDATA" /var/run/postgresql \! -user postgres -exec chown postgres '{}' +
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
fi

sql() {
    PGHOST= PGHOSTADDR= psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password \
        --no-psqlrc "$@"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "Error: database is uninitialized and POSTGRES_PASSWORD is not set." >&2
        exit 1
    fi
    ls /docker-entrypoint-initdb.d/ >/dev/null
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        ${POSTGRES_INITDB_ARGS:-}
    auth=$(postgres -C password_encryption)
    printf '\nhost all all all %s\n' "$auth" >> "$PGDATA/pg_hba.conf"

    export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
    NOTIFY_SOCKET= PGUSER="${PGUSER:-$POSTGRES_USER}" \
        pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start
    if [ -z "$(sql --dbname postgres --set db="$POSTGRES_DB" --tuples-only \
            <<< "SELECT 1 FROM pg_database WHERE datname = :'db'")" ]; then
        sql --dbname postgres --set db="$POSTGRES_DB" <<< 'CREATE DATABASE :"db"'
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sh)
                if [ -x "$f" ]; then
                    echo "$0: running $f"
                    "$f"
                else
                    echo "$0: sourcing $f"
                    # shellcheck disable=SC1090
                    . "$f"
                fi
                ;;
            *.sql) echo "$0: running $f"; sql --dbname "$POSTGRES_DB" -f "$f" ;;
            *) if [ -e "$f" ]; then echo "$0: ignoring $f"; fi ;;
        esac
    done
    PGUSER="${PGUSER:-postgres}" pg_ctl -D "$PGDATA" -m fast -w stop
    unset PGPASSWORD
    echo "PostgreSQL init process complete; ready for start up."
else
    echo "PostgreSQL Database directory appears to contain a database; Skipping initialization"
fi

exec "$@"
