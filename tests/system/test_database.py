"""The schema from `pipeline migrate`, its roles, and a cluster that crashes and comes back."""

from __future__ import annotations

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
        [sys.executable, "-m", "pipeline", "migrate", "--database-url", database.owner_url],
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
    url = postgres.url(name)
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
    # Either index answers it (the planner weighs them by the sample); never the whole table.
    assert "readings_sensor_ts" in plan or "readings_ts" in plan, plan
    assert "Seq Scan" not in plan, plan


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
