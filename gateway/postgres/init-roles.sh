#!/usr/bin/env bash
# Login roles for the gateway's database. docker compose runs this at every `up` (the one-shot
# service db-roles, as the superuser, before `pipeline migrate`); the test fixtures run the same
# file against their private cluster. Re-running it is safe: it resets the passwords to the
# environment's (a password changed in .env takes effect) and hands the schema's objects to
# the owner role (a database made before that role existed is upgraded this way).
#
#   tempmon_owner (MIGRATE_DB_USER): owns the database, the schema's objects and runs
#                 `pipeline migrate`; not a superuser, cannot create roles or databases
#   pipeline      (PIPELINE_DB_USER): member of tempmon_writer; the consumers
#   reader        (READER_DB_USER):   member of tempmon_reader; people, Grafana
#
# The group roles' table privileges are granted by `pipeline migrate` (the schema's owner), so
# this file only creates the roles, hands the database to the owner and lets the others
# connect. Passwords come from the environment (MIGRATE_DB_PASSWORD, PIPELINE_DB_PASSWORD,
# READER_DB_PASSWORD) and are read with psql's \getenv, never put on a command line; the
# session turns statement logging off first, so a password in ALTER ROLE never reaches the
# server's log, even when the statement fails.
set -euo pipefail

: "${MIGRATE_DB_PASSWORD:?MIGRATE_DB_PASSWORD is not set (see .env.example)}"
: "${PIPELINE_DB_PASSWORD:?PIPELINE_DB_PASSWORD is not set (see .env.example)}"
: "${READER_DB_PASSWORD:?READER_DB_PASSWORD is not set (see .env.example)}"
export MIGRATE_DB_USER="${MIGRATE_DB_USER:-tempmon_owner}"
export PIPELINE_DB_USER="${PIPELINE_DB_USER:-pipeline}"
export READER_DB_USER="${READER_DB_USER:-reader}"
database="${POSTGRES_DB:-${PGDATABASE:-postgres}}"

psql -X -q -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-${PGUSER:-postgres}}" --dbname "$database" \
    -v db="$database" <<'SQL'
-- Nothing of this session reaches the server's log: not the statements (log_statement,
-- log_min_duration_statement), not a failing one (log_min_error_statement).
SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_error_statement = 'panic';
SET password_encryption = 'scram-sha-256';

\getenv owner_user MIGRATE_DB_USER
\getenv owner_password MIGRATE_DB_PASSWORD
\getenv pipeline_user PIPELINE_DB_USER
\getenv pipeline_password PIPELINE_DB_PASSWORD
\getenv reader_user READER_DB_USER
\getenv reader_password READER_DB_PASSWORD

SELECT 'CREATE ROLE tempmon_writer NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tempmon_writer') \gexec
SELECT 'CREATE ROLE tempmon_reader NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tempmon_reader') \gexec

SELECT format('CREATE ROLE %I LOGIN', :'owner_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner_user') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
              'NOBYPASSRLS PASSWORD %L', :'owner_user', :'owner_password') \gexec
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
-- A reader's query cannot hold the database hostage. Any session may SET this lower or
-- higher, so it is only the default: migration 0004's cancel_overlong_reader_queries(), run
-- by the consumers, cancels what runs longer anyway, with the owner's pg_signal_backend.
ALTER ROLE :"reader_user" SET statement_timeout = '60s';
GRANT pg_signal_backend, pg_read_all_stats TO :"owner_user";

-- The owner role owns the database (and so, since PostgreSQL 15, the public schema), and
-- whatever an earlier version created there as the superuser.
ALTER DATABASE :"db" OWNER TO :"owner_user";
SELECT format('ALTER TABLE %s OWNER TO %I', c.oid::regclass, :'owner_user')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'owner_user') \gexec
SELECT format('ALTER SEQUENCE %s OWNER TO %I', c.oid::regclass, :'owner_user')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind = 'S'
   AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'owner_user')
   AND NOT EXISTS (SELECT FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.deptype IN ('a', 'i')) \gexec
SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, :'owner_user')
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public'
   AND p.proowner <> (SELECT oid FROM pg_roles WHERE rolname = :'owner_user') \gexec

-- Only these roles (and the owner) may connect to the gateway's database; none may create
-- temporary tables (nothing needs them, and they escape the schema's privileges).
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
REVOKE TEMPORARY ON DATABASE :"db" FROM tempmon_writer, tempmon_reader;
GRANT CONNECT ON DATABASE :"db" TO tempmon_writer, tempmon_reader;
SQL
echo "init-roles.sh: roles ${MIGRATE_DB_USER} (owner), ${PIPELINE_DB_USER} and ${READER_DB_USER} are in place in ${database}"
