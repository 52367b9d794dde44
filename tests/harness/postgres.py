"""A private PostgreSQL cluster from the installed server binaries."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg

from tests.harness.procs import REPO, free_port, service_user

GATEWAY = REPO / "gateway" / "postgres"
# The gateway's login roles (gateway/postgres/init-roles.sh's defaults), by what they are for.
ROLES = {"owner": "tempmon_owner", "pipeline": "pipeline", "reader": "reader"}


def _bindir() -> str:
    if "PG_BINDIR" in os.environ:
        return os.environ["PG_BINDIR"]
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql: run tests/run.sh")
    return str(versions[-1])


class PostgresServer:
    """One PostgreSQL cluster in a temp directory on a free port.

    Runs as the ``postgres`` system user when the tests run as root (PostgreSQL refuses root).
    Local socket connections are trusted; TCP needs a password (scram-sha-256), so role and
    privilege tests see the same authentication as the gateway.
    """

    def __init__(self, *, keep: bool = False) -> None:
        self.bindir = _bindir()
        self.keep = keep
        self.port = free_port()
        self.superuser = "postgres"
        self.password = secrets.token_urlsafe(12)
        self.dir = Path(tempfile.mkdtemp(prefix="tempmon-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log = self.dir / "server.log"
        self._user = service_user("postgres")
        self.boot_seconds: list[float] = []
        self._dbs = 0
        # The gateway's login roles are the cluster's, shared by every database in it, so
        # their passwords are the server's: one init-roles.sh run never breaks another's URLs.
        self.role_passwords = {role: secrets.token_urlsafe(12) for role in ROLES}
        # (name, the server's date when it was migrated) of migrated_database()'s template.
        self._template: tuple[str, str] | None = None
        self._initdb()

    def _as_service(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.dir,
            **self._as_service(),  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def _initdb(self) -> None:
        self.socket_dir.mkdir()
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._user is not None:
            for path in (self.dir, self.socket_dir, pwfile):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self._run(
            f"{self.bindir}/initdb",
            "-D",
            str(self.data),
            "-U",
            self.superuser,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                # fsync off is safe against a killed process (the OS keeps the pages); it is
                # only unsafe on power loss, which these tests do not simulate.
                "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
                "log_min_messages = warning\n"
            )

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        if self.running:
            return
        began = time.monotonic()
        self._run(
            f"{self.bindir}/pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.boot_seconds.append(time.monotonic() - began)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: orderly; ``immediate``: a crash (PostgreSQL recovers from WAL at start)."""
        if self.running:
            self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def kill(self) -> None:
        # Backends leave the postmaster's process group, so a group kill would leave them
        # holding shared memory; an immediate stop is PostgreSQL's own crash.
        self.stop("immediate")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- access ----------------------------------------------------------------------------
    def url(
        self,
        database: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        driver: str = "postgresql",
    ) -> str:
        user = user or self.superuser
        password = self.password if password is None and user == self.superuser else password
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"{driver}://{auth}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(database), autocommit=True)

    def create_database(self, prefix: str = "t") -> str:
        self._dbs += 1
        name = f"{prefix}_{self._dbs}_{secrets.token_hex(3)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def role_url(self, database: str, role: str) -> str:
        """The URL of one of the gateway's login roles (``owner``, ``pipeline``, ``reader``)."""
        return self.url(database, ROLES[role], self.role_passwords[role])

    def owned_database(self, prefix: str = "t") -> tuple[str, str]:
        """A new database with the gateway's roles, migrated by its owner role, as docker
        compose makes it; returns (name, the owner's URL)."""
        from pipeline.migrate import migrate  # noqa: PLC0415

        name = self.create_database(prefix)
        self.init_roles(name)
        url = self.role_url(name, "owner")
        migrate(url)
        return name, url

    def migrated_database(self, prefix: str = "t") -> tuple[str, str]:
        """What :meth:`owned_database` makes, copied from a template made by it.

        `pipeline migrate` runs once (a second or more on a loaded machine) into a template
        database; each new database is a copy of it (``CREATE DATABASE ... TEMPLATE``: the
        schema, its owners and privileges, the migration records), then init-roles.sh runs on
        the copy as on a fresh database, for what a copy does not inherit (the database's owner
        and its CONNECT and TEMPORARY privileges). Migration 0006 makes partitions around the
        server's ``now()``, so a new template is made when the server's date has changed.
        """
        with self.connect() as conn:
            row = conn.execute("SELECT now()::date::text").fetchone()
        today = str(row[0]) if row else ""
        if self._template is None or self._template[1] != today:
            template, _ = self.owned_database("template")
            self._template = (template, today)
        template = self._template[0]
        self._dbs += 1
        name = f"{prefix}_{self._dbs}_{secrets.token_hex(3)}"
        with self.connect() as conn:
            # A copy needs its template without sessions; none is left open on purpose.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (template,),
            )
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self.init_roles(name)
        return name, self.role_url(name, "owner")

    def init_roles(
        self,
        database: str,
        passwords: dict[str, str] | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> None:
        """Run gateway/postgres/init-roles.sh, as the official image runs it at first boot.

        Raises:
            RuntimeError: the script failed; its output is in the message.
        """
        passwords = passwords or self.role_passwords
        env = dict(os.environ)
        env.update(env_extra or {})
        env.update(
            PGHOST="127.0.0.1",
            PGPORT=str(self.port),
            PGUSER=self.superuser,
            PGPASSWORD=self.password,
            PGDATABASE=database,
            POSTGRES_DB=database,
            MIGRATE_DB_PASSWORD=passwords["owner"],
            PIPELINE_DB_PASSWORD=passwords["pipeline"],
            READER_DB_PASSWORD=passwords["reader"],
        )
        done = subprocess.run(
            ["bash", str(GATEWAY / "init-roles.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"init-roles.sh failed: {done.stdout}{done.stderr}")
