#!/usr/bin/env bash
# Login roles for the gateway's database. The official postgres image runs this once, at the
# first boot of an empty volume (mounted into /docker-entrypoint-initdb.d/); the test fixtures
# run the same file against their private cluster. Re-running it is safe: it resets passwords.
#
#   pipeline  (PIPELINE_DB_USER, default pipeline): member of tempmon_writer; the consumers
#   reader    (READER_DB_USER, default reader):     member of tempmon_reader; people, Grafana
#
# The group roles' table privileges are granted by `pipeline migrate` (the schema's owner), so
# this file only creates the roles and lets them connect. Passwords come from the environment
# (PIPELINE_DB_PASSWORD, READER_DB_PASSWORD) and are read with psql's \getenv, never put on a
# command line.
set -euo pipefail

: "${PIPELINE_DB_PASSWORD:?PIPELINE_DB_PASSWORD is not set (see .env.example)}"
: "${READER_DB_PASSWORD:?READER_DB_PASSWORD is not set (see .env.example)}"
export PIPELINE_DB_USER="${PIPELINE_DB_USER:-pipeline}"
export READER_DB_USER="${READER_DB_USER:-reader}"
database="${POSTGRES_DB:-${PGDATABASE:-postgres}}"

psql -X -q -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-${PGUSER:-postgres}}" --dbname "$database" \
    -v db="$database" <<'SQL'
\getenv pipeline_user PIPELINE_DB_USER
\getenv pipeline_password PIPELINE_DB_PASSWORD
\getenv reader_user READER_DB_USER
\getenv reader_password READER_DB_PASSWORD

SELECT 'CREATE ROLE tempmon_writer NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tempmon_writer') \gexec
SELECT 'CREATE ROLE tempmon_reader NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tempmon_reader') \gexec

SELECT format('CREATE ROLE %I LOGIN', :'pipeline_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'pipeline_user') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'pipeline_user', :'pipeline_password') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'reader_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader_user') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'reader_user', :'reader_password') \gexec

GRANT tempmon_writer TO :"pipeline_user";
GRANT tempmon_reader TO :"reader_user";
-- A reader's query cannot hold the database hostage.
ALTER ROLE :"reader_user" SET statement_timeout = '60s';

-- Only these roles (and the owner) may connect to the gateway's database.
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO tempmon_writer, tempmon_reader;
SQL
echo "init-roles.sh: roles ${PIPELINE_DB_USER} and ${READER_DB_USER} are in place in ${database}"
