"""The schema from `pipeline migrate`, its roles, and a cluster that crashes and comes back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pipeline import migrate as migrate_module
from pipeline.errors import MigrationError
from pipeline.migrate import Migration, available, migrate
from tests.conftest import Database

pytestmark = pytest.mark.system

_INSERT = (
    "INSERT INTO readings (node, sensor, seq, kind, ts, temperature_c, humidity_pct)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)


def _row(seq: int, node: str = "pi-1", sensor: str = "t1") -> tuple[object, ...]:
    return (node, sensor, seq, "dht22", datetime.now(UTC), 21.5, 40.0)


def test_migrate_is_recorded_and_rerunnable(database: Database) -> None:
    assert migrate(database.owner_url) == []  # the fixture already ran it
    with psycopg.connect(database.owner_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in available()]


def test_migrate_cli_is_rerunnable(database: Database) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "migrate"],
        env={**os.environ, "DATABASE_URL": database.owner_url},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout


def test_concurrent_migrations_apply_each_file_once(postgres: object) -> None:
    from tests.harness import PostgresServer  # noqa: PLC0415

    assert isinstance(postgres, PostgresServer)
    name = postgres.create_database()
    postgres.init_roles(name)
    url = postgres.role_url(name, "owner")
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(len(migrate(url)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(results) == [0, 0, len(available())]
    postgres.drop_database(name)


def test_edited_migration_is_refused(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in available()]
    monkeypatch.setattr(migrate_module, "available", lambda: edited)
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(database.owner_url)


def test_natural_key_keeps_one_row(database: Database) -> None:
    with psycopg.connect(database.writer_url) as conn:
        for _ in range(3):
            conn.execute(_INSERT, _row(7))
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("node", "pi.1"),
        ("sensor", "a/b"),
        ("seq", -1),
        ("kind", "thermistor"),
        ("humidity_pct", 101.0),
        ("temperature_c", float("nan")),
    ],
)
def test_constraints_refuse_what_the_contract_forbids(
    database: Database, column: str, value: object
) -> None:
    row = dict(
        zip(
            ("node", "sensor", "seq", "kind", "ts", "temperature_c", "humidity_pct"),
            _row(1),
            strict=True,
        )
    )
    row[column] = value
    with psycopg.connect(database.writer_url) as conn, pytest.raises(psycopg.errors.IntegrityError):
        conn.execute(_INSERT, tuple(row.values()))


def test_writer_inserts_but_cannot_destroy(database: Database) -> None:
    with psycopg.connect(database.writer_url, autocommit=True) as conn:
        conn.execute(_INSERT, _row(1))
        for forbidden in (
            "DELETE FROM readings",
            "UPDATE readings SET temperature_c = 0",
            "TRUNCATE readings",
            "DROP TABLE readings",
            "CREATE TABLE mine (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)


def test_reader_only_reads(database: Database) -> None:
    with psycopg.connect(database.writer_url, autocommit=True) as conn:
        conn.execute(_INSERT, _row(1))
    with psycopg.connect(database.reader_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)
        for forbidden in (
            "INSERT INTO readings (node) VALUES ('x')",
            "DELETE FROM readings",
            "CREATE TABLE mine (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)


def test_wrong_password_is_refused(database: Database) -> None:
    url = database.server.url(database.name, "reader", "wrong-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url)


def test_recent_range_of_one_sensor_uses_the_index(database: Database) -> None:
    start = datetime.now(UTC) - timedelta(days=3)
    rows = [
        (f"pi-{n % 10}", f"s{n % 7}", n, "simulated", start + timedelta(seconds=n * 13), 20.0, None)
        for n in range(20_000)
    ]
    with psycopg.connect(database.owner_url) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY readings (node, sensor, seq, kind, ts, temperature_c, humidity_pct)"
                " FROM STDIN"
            ) as copy,
        ):
            for row in rows:
                copy.write_row(row)
        conn.execute("ANALYZE readings")
        plan = "\n".join(
            str(r[0])
            for r in conn.execute(
                "EXPLAIN SELECT avg(temperature_c) FROM readings"
                " WHERE node = 'pi-3' AND sensor = 's2' AND ts > now() - interval '1 hour'"
            )
        )
    # Only today's partition (and the empty ones ahead) can hold the last hour; in it either
    # index answers (the planner weighs them by the sample), never the whole partition.
    now = datetime.now(UTC)
    today = f"readings_p{now:%Y%m%d}"
    assert f"on {today} " in plan, plan
    assert "_node_sensor_ts_idx" in plan or "_ts_idx" in plan, plan
    assert f"Seq Scan on {today} " not in plan, plan
    for back in range(1, 4):
        day = now - timedelta(days=back)
        if day.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) < (
            now - timedelta(hours=1)
        ):
            assert f"readings_p{day:%Y%m%d} " not in plan, plan  # pruned: wholly too old


def test_committed_rows_survive_a_database_crash(database: Database) -> None:
    with psycopg.connect(database.writer_url, autocommit=True) as conn:
        for seq in range(100):
            conn.execute(_INSERT, _row(seq))
    database.server.kill()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database.writer_url, connect_timeout=2)
    database.server.start()
    with psycopg.connect(database.writer_url) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (100,)


# --- who owns what, and what the roles cannot do (issue: security review) ---------------------


def test_migrate_refuses_a_superuser(database: Database) -> None:
    """Whoever migrates owns the tables: never a superuser."""
    with pytest.raises(MigrationError, match="superuser"):
        migrate(database.superuser_url)


def test_the_schema_belongs_to_an_owner_that_is_not_a_superuser(database: Database) -> None:
    with psycopg.connect(database.superuser_url, autocommit=True) as conn:
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')"
            " UNION SELECT DISTINCT pg_get_userbyid(p.proowner) FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
            " UNION SELECT pg_get_userbyid(datdba) FROM pg_database"
            " WHERE datname = current_database()"
        ).fetchall()
        assert owners == [("tempmon_owner",)]
        role = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = 'tempmon_owner'"
        ).fetchone()
        assert role == (False, False, False, False, False)


def test_a_superuser_owned_schema_is_handed_to_the_owner(postgres: object) -> None:
    """A gateway made before the owner role: its tables belong to the superuser. Re-running
    init-roles.sh (the README's upgrade step) hands them to the owner, which migrates on."""
    from tests.harness import PostgresServer  # noqa: PLC0415

    assert isinstance(postgres, PostgresServer)
    name = postgres.create_database()
    postgres.init_roles(name)
    with psycopg.connect(postgres.url(name), autocommit=True) as conn:
        # What `pipeline migrate` did as the superuser before this release.
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in available():
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (m.version, m.name, m.checksum),
                )
        assert conn.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'readings'"
        ).fetchone() == ("postgres",)
    with pytest.raises(MigrationError):
        migrate(postgres.role_url(name, "owner"))  # it may not even read schema_migrations
    postgres.init_roles(name)
    assert migrate(postgres.role_url(name, "owner")) == []
    with psycopg.connect(postgres.url(name), autocommit=True) as conn:
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
        ).fetchall()
    assert owners == [("tempmon_owner",)]
    postgres.drop_database(name)


@pytest.mark.parametrize("role", ["writer", "reader"])
def test_roles_cannot_create_temporary_tables(database: Database, role: str) -> None:
    url = database.writer_url if role == "writer" else database.reader_url
    with (
        psycopg.connect(url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("CREATE TEMPORARY TABLE hoard (x text)")


def test_a_reader_query_that_overrides_its_timeout_is_cancelled(database: Database) -> None:
    """statement_timeout is only the reader role's default: a session may SET it to 0. The
    watchdog function (run by the consumers as the writer) cancels such a query anyway."""
    errors: list[BaseException] = []

    def long_query() -> None:
        try:
            with psycopg.connect(database.reader_url, autocommit=True) as conn:
                conn.execute("SET statement_timeout = 0")
                conn.execute("SELECT pg_sleep(60)")
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    reader = threading.Thread(target=long_query)
    reader.start()
    with psycopg.connect(database.writer_url, autocommit=True) as conn:
        # Asked for 1 s, the function still spares queries younger than 5 s.
        assert conn.execute("SELECT cancel_overlong_reader_queries('1 second')").fetchone() == (0,)
        cancelled = 0
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while not cancelled and datetime.now(UTC) < deadline:
            row = conn.execute("SELECT cancel_overlong_reader_queries('1 second')").fetchone()
            cancelled = int(row[0]) if row else 0
            threading.Event().wait(0.5)
        # The writer cannot cancel anything else on its own.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity LIMIT 1")
    reader.join(30)
    assert cancelled == 1, errors
    assert len(errors) == 1
    assert isinstance(errors[0], psycopg.errors.QueryCanceled), errors


def test_role_passwords_never_reach_the_server_log(postgres: object) -> None:
    """init-roles.sh sets passwords with ALTER ROLE: with every statement logged, and with a
    statement that fails, the password still never appears in the server's log."""
    from tests.harness import PostgresServer  # noqa: PLC0415

    assert isinstance(postgres, PostgresServer)
    name = postgres.create_database()
    with psycopg.connect(postgres.url(name), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
    postgres.init_roles(name)
    # A run whose ALTER ROLE fails: the reader's name is a role PostgreSQL reserves.
    secret = "leak-check-" + name
    with pytest.raises(RuntimeError, match=r"init-roles\.sh failed"):
        postgres.init_roles(
            name,
            {**postgres.role_passwords, "reader": secret},
            env_extra={"READER_DB_USER": "pg_monitor"},
        )
    postgres.init_roles(name)
    log = postgres.log.read_text(errors="replace")
    assert "init-roles" not in log  # the statements themselves were logged nowhere
    assert secret not in log
    for password in postgres.role_passwords.values():
        assert password not in log
    postgres.drop_database(name)


@pytest.mark.slow
def test_the_consumer_cancels_a_reader_query_over_its_limit(
    rabbit: object, database: Database
) -> None:
    """`pipeline consume` runs the watchdog: a reader query that SET its timeout to 0 is still
    cancelled once it has run longer than PIPELINE_READER_QUERY_LIMIT_S."""
    from tests.harness import RabbitBroker  # noqa: PLC0415
    from tests.harness.pipeline_proc import ConsumerProcess  # noqa: PLC0415
    from tests.harness.procs import wait_for  # noqa: PLC0415

    assert isinstance(rabbit, RabbitBroker)
    errors: list[BaseException] = []
    finished = threading.Event()

    def long_query() -> None:
        try:
            with psycopg.connect(database.reader_url, autocommit=True) as conn:
                conn.execute("SET statement_timeout = 0")
                conn.execute("SELECT pg_sleep(120)")
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)
        finished.set()

    with ConsumerProcess(
        rabbit, database.writer_url, extra_env={"PIPELINE_READER_QUERY_LIMIT_S": "5"}
    ) as consumer:
        reader = threading.Thread(target=long_query)
        started = datetime.now(UTC)
        reader.start()
        assert finished.wait(60), "the reader's query was not cancelled"
        took = (datetime.now(UTC) - started).total_seconds()
        reader.join(10)
        # The reader hears of the cancel before the consumer has logged it.
        wait_for("the watchdog's log line", lambda: "cancelled reader queries" in consumer.log, 10)
    assert len(errors) == 1
    assert isinstance(errors[0], psycopg.errors.QueryCanceled), errors
    assert 5 <= took < 30, took
