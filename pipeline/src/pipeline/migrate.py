"""Versioned, re-runnable schema migrations: plain SQL files applied in order.

Each file ``migrations/NNNN_name.sql`` runs once, in its own transaction, and is recorded in
``schema_migrations`` with a checksum. Concurrent runs (two replicas starting together) are
serialised by an advisory lock, so each file still runs once. A recorded file whose text
changed afterwards is an error: a released migration is never edited, a new one is added.

Migrations run as the schema's owner role (``tempmon_owner``, made by
gateway/postgres/init-roles.sh), never as a superuser: whoever runs them owns every table, and
a superuser owning them would make every SECURITY DEFINER function and every default
privilege a superuser's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import psycopg

from pipeline.db import libpq_url
from pipeline.errors import MigrationError

__all__ = ["Migration", "available", "migrate"]

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every migrating process.
_LOCK_KEY = 0x7E3D_0001


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with the package, in version order."""
    found: list[Migration] = []
    for entry in resources.files("pipeline.migrations").iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        stem = name.removesuffix(".sql")
        number, _, label = stem.partition("_")
        if not number.isdigit():
            raise MigrationError(f"migration file {name!r} does not start with a number")
        found.append(Migration(int(number), label, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


def migrate(database_url: str, *, upto: int | None = None) -> list[Migration]:
    """Bring the database to the newest version (or to ``upto``); return the migrations that
    ran now.

    Raises:
        MigrationError: a recorded migration's text changed, or a migration failed (its
            transaction is rolled back and the error names the file).
        psycopg.OperationalError: the database cannot be reached.
    """
    applied_now: list[Migration] = []
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        if row is not None and row[1]:
            raise MigrationError(
                f"refusing to migrate as {row[0]!r}, a superuser: the tables would belong to "
                "it. Connect as the schema's owner role (MIGRATE_DB_USER, default "
                "tempmon_owner, made by gateway/postgres/init-roles.sh)"
            )
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    int(row[0]): str(row[1])
                    for row in conn.execute("SELECT version, checksum FROM schema_migrations")
                }
            except psycopg.errors.InsufficientPrivilege as exc:
                raise MigrationError(
                    f"{row[0] if row else 'this role'} may not read schema_migrations: the "
                    "schema belongs to another role (an earlier version migrated as the "
                    "superuser). Run gateway/postgres/init-roles.sh once as the superuser to "
                    f"hand it to the owner role: {str(exc).strip()}"
                ) from exc
            for migration in available():
                if upto is not None and migration.version > upto:
                    break
                recorded = done.get(migration.version)
                if recorded is not None:
                    if recorded != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name}.sql changed "
                            "after it was applied: add a new migration instead of editing it"
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(migration.sql.encode())
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum)"
                            " VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name}.sql failed: {exc}"
                    ) from exc
                log.info(
                    "migration applied version=%04d name=%s", migration.version, migration.name
                )
                applied_now.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now
