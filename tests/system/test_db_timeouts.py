"""The consumer never waits on PostgreSQL without bound (issue 13, item 3).

Without timeouts a connection whose network path died silently blocked the writer for many
minutes (the kernel's retransmissions, or for ever while waiting for a reply) while
pipeline_database_up stayed 1 and nothing was logged, and a new connection waited about two
minutes. The consumer's engine now carries connect_timeout, TCP keepalives, tcp_user_timeout
and a server-side statement_timeout and lock_timeout; migrations do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from pipeline import migrate as migrate_module
from pipeline.config import ConsumerSettings
from pipeline.db import make_engine
from pipeline.decode import NodeStatus, Reading
from pipeline.migrate import migrate
from pipeline.store import Store
from tests.conftest import Database

pytestmark = pytest.mark.system


def _settings(database: Database, **env: str) -> ConsumerSettings:
    return ConsumerSettings.from_env(
        {"RABBITMQ_URL": "amqp://localhost/", "DATABASE_URL": database.writer_url, **env}
    )


def _consumer_engine(settings: ConsumerSettings) -> Engine:
    """The engine as `pipeline consume` builds it (pipeline.cli)."""
    return make_engine(settings.database_url, timeouts=settings.database_timeouts)


def _readings(start: int, n: int, node: str = "pi-a") -> list[Reading]:
    at = datetime.now(UTC) - timedelta(minutes=1)
    return [
        Reading(node, "t1", "ds18b20", seq, at + timedelta(milliseconds=seq), 20.0, None, False)
        for seq in range(start, start + n)
    ]


# --- the settings reach every connection --------------------------------------------------------


def test_a_consumer_connection_carries_the_timeouts(database: Database) -> None:
    engine = _consumer_engine(_settings(database))
    try:
        with engine.connect() as conn:
            shown = {
                name: conn.execute(text(f"SHOW {name}")).scalar_one()
                for name in (
                    "statement_timeout",
                    "lock_timeout",
                    "idle_in_transaction_session_timeout",
                    "tcp_user_timeout",
                    "tcp_keepalives_idle",
                    "tcp_keepalives_interval",
                    "tcp_keepalives_count",
                )
            }
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, psycopg.Connection)
            params = raw.info.get_parameters()
            sock = socket.socket(fileno=os.dup(raw.pgconn.socket))
            try:
                kernel = {
                    "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    "TCP_KEEPIDLE": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    "TCP_KEEPINTVL": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    "TCP_KEEPCNT": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    "TCP_USER_TIMEOUT": sock.getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT
                    ),
                }
            finally:
                sock.close()
    finally:
        engine.dispose()
    assert shown == {
        "statement_timeout": "30s",
        "lock_timeout": "10s",
        # the server's side of the connection: a vanished consumer's locks are released
        "idle_in_transaction_session_timeout": "1min",
        "tcp_user_timeout": "30000",
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
    }
    assert {
        k: params.get(k)
        for k in (
            "connect_timeout",
            "keepalives",
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_count",
            "tcp_user_timeout",
        )
    } == {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
    }
    assert kernel == {
        "SO_KEEPALIVE": 1,
        "TCP_KEEPIDLE": 30,
        "TCP_KEEPINTVL": 10,
        "TCP_KEEPCNT": 3,
        "TCP_USER_TIMEOUT": 30000,
    }
    assert engine.pool.timeout() == 10  # type: ignore[attr-defined]


def test_the_timeouts_follow_the_environment(database: Database) -> None:
    settings = _settings(
        database,
        PIPELINE_DB_CONNECT_TIMEOUT_S="4",
        PIPELINE_DB_TCP_TIMEOUT_S="12",
        PIPELINE_DB_STATEMENT_TIMEOUT_S="0",
        PIPELINE_DB_LOCK_TIMEOUT_S="2",
    )
    engine = _consumer_engine(settings)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "0"
            assert conn.execute(text("SHOW lock_timeout")).scalar_one() == "2s"
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, psycopg.Connection)
            params = raw.info.get_parameters()
    finally:
        engine.dispose()
    assert params["connect_timeout"] == "4"
    assert params["keepalives_idle"] == "12"
    assert params["keepalives_interval"] == "4"
    assert params["tcp_user_timeout"] == "12000"


def test_what_the_url_sets_itself_wins(database: Database) -> None:
    url = database.writer_url + "?connect_timeout=3&options=-c%20lock_timeout%3D7s"
    settings = ConsumerSettings(rabbitmq_url="amqp://localhost/", database_url=url)
    engine = _consumer_engine(settings)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW lock_timeout")).scalar_one() == "7s"
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "30s"
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, psycopg.Connection)
            assert raw.info.get_parameters()["connect_timeout"] == "3"
    finally:
        engine.dispose()


def test_pgoptions_still_applies(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq reads PGOPTIONS only when no options are given; the timeouts give some."""
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=5MB -c lock_timeout=3s")
    engine = _consumer_engine(_settings(database))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW work_mem")).scalar_one() == "5MB"
            assert conn.execute(text("SHOW lock_timeout")).scalar_one() == "3s"
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "30s"
    finally:
        engine.dispose()


def test_migrations_run_without_the_statement_timeout(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    connect: Callable[..., psycopg.Connection[tuple[object, ...]]] = psycopg.connect

    def spying_connect(*args: object, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
        conn = connect(*args, **kwargs)  # type: ignore[arg-type]
        row = conn.execute("SHOW statement_timeout").fetchone()
        seen.append(str(row[0]) if row else "")
        return conn

    monkeypatch.setenv("PIPELINE_DB_STATEMENT_TIMEOUT_S", "1")
    monkeypatch.setattr(migrate_module.psycopg, "connect", spying_connect)
    assert migrate(database.owner_url) == []
    assert seen == ["0"]


def test_a_write_stuck_behind_a_lock_gives_up_after_lock_timeout(database: Database) -> None:
    settings = _settings(
        database, PIPELINE_DB_LOCK_TIMEOUT_S="1", PIPELINE_DB_STATEMENT_TIMEOUT_S="0"
    )
    engine = _consumer_engine(settings)
    store = Store(engine)
    status = NodeStatus("pi-a", "online", None, None, None, None, None, None)
    try:
        store.write([], [status])
        with psycopg.connect(database.owner_url) as holder:
            holder.execute("SELECT 1 FROM nodes FOR UPDATE")
            began = time.monotonic()
            with pytest.raises(OperationalError, match="lock timeout"):
                store.write([], [status])
            took = time.monotonic() - began
    finally:
        engine.dispose()
    print(f"lock wait ended after {took:.2f} s")
    assert 0.9 < took < 10


def test_a_statement_over_statement_timeout_is_cancelled(database: Database) -> None:
    settings = _settings(
        database, PIPELINE_DB_LOCK_TIMEOUT_S="0", PIPELINE_DB_STATEMENT_TIMEOUT_S="1"
    )
    engine = _consumer_engine(settings)
    store = Store(engine)
    try:
        store.write(_readings(0, 1))
        with psycopg.connect(database.owner_url) as holder:
            holder.execute("SELECT 1 FROM readings_minute FOR UPDATE")
            began = time.monotonic()
            with pytest.raises(OperationalError, match="statement timeout"):
                store.write(_readings(1, 1))
            took = time.monotonic() - began
    finally:
        engine.dispose()
    print(f"statement cancelled after {took:.2f} s")
    assert 0.9 < took < 10


# --- a network path that dies silently ----------------------------------------------------------


def _iptables_usable() -> str | None:
    """Why the cut cannot be made here, or None."""
    if os.geteuid() != 0:
        return "cutting the network path needs root (iptables); CI runs the tests as root"
    if shutil.which("iptables") is None:
        return "iptables is not installed (it comes with docker.io)"
    done = subprocess.run(
        ["iptables", "-w", "10", "-S", "INPUT"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return f"iptables does not work here: {done.stderr.strip()}"
    return None


def _rules(port: int) -> list[list[str]]:
    """Both directions of every TCP connection to ``port`` on loopback, silently dropped."""
    return [
        ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
        ["OUTPUT", "-o", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
    ]


@contextlib.contextmanager
def _network_cut(port: int) -> Iterator[None]:
    added: list[list[str]] = []
    try:
        for rule in _rules(port):
            subprocess.run(["iptables", "-w", "10", "-I", *rule], check=True, timeout=30)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "10", "-D", *rule], check=False, timeout=30)


def _local(database: Database) -> psycopg.Connection[tuple[object, ...]]:
    """The superuser over the Unix socket: the cut does not touch it."""
    server = database.server
    return psycopg.connect(
        host=str(server.socket_dir),
        port=server.port,
        user=server.superuser,
        dbname=database.name,
        autocommit=True,
    )


def _timed(action: Callable[[], object]) -> tuple[float, BaseException | None]:
    began = time.monotonic()
    try:
        action()
    except BaseException as exc:  # noqa: BLE001 - returned to the caller to check
        return time.monotonic() - began, exc
    return time.monotonic() - began, None


@pytest.mark.slow
def test_a_silently_dead_network_path_fails_the_write_within_the_timeouts(
    database: Database,
) -> None:
    """The path to PostgreSQL is cut while a write waits for the server's reply; the write
    must fail within the keepalive limit, an idle held connection's next write within
    tcp_user_timeout plus a reconnect, a new connection within connect_timeout; once the path
    is back, the same batch commits (as a redelivered batch would)."""
    if (why := _iptables_usable()) is not None:
        pytest.skip(why)
    settings = _settings(
        database,
        PIPELINE_DB_CONNECT_TIMEOUT_S="2",
        PIPELINE_DB_TCP_TIMEOUT_S="3",
        PIPELINE_DB_STATEMENT_TIMEOUT_S="10",
        PIPELINE_DB_LOCK_TIMEOUT_S="2",
    )
    waiting, pooled = _consumer_engine(settings), _consumer_engine(settings)
    store, other = Store(waiting), Store(pooled)
    # The slow status makes the write wait for the server while the path is cut.
    with _local(database) as su:
        su.execute(
            "CREATE FUNCTION slow_status() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$"
        )
        su.execute(
            "CREATE TRIGGER slow_status BEFORE INSERT ON nodes FOR EACH ROW"
            " WHEN (NEW.agent_version = 'slow') EXECUTE FUNCTION slow_status()"
        )
    slow = NodeStatus("pi-slow", "online", None, "slow", None, None, None, None)
    batch = _readings(100, 50)
    outcome: list[tuple[float, BaseException | None]] = []
    measured: dict[str, float] = {}
    try:
        store.write(_readings(0, 50))
        other.write(_readings(50, 50))  # both stores hold a live connection
        writer = threading.Thread(
            target=lambda: outcome.append(_timed(lambda: store.write(batch, [slow])))
        )
        writer.start()
        with _local(database) as su:
            deadline = time.monotonic() + 20
            while not su.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            ).fetchone():
                assert time.monotonic() < deadline, "the slow write never reached the server"
                time.sleep(0.01)
        # The request is in, and the server sleeps before it replies: cut the path now.
        with _network_cut(database.server.port):
            cut_at = time.monotonic()
            writer.join(120)
            assert not writer.is_alive(), "Store.write still hangs 2 minutes after the cut"
            measured["waiting for a reply"] = time.monotonic() - cut_at
            took, error = outcome[0]
            assert isinstance(error, OperationalError), error
            print(f"waiting write failed: {str(error.orig).strip().splitlines()[0]}")

            took, error = _timed(lambda: other.write(_readings(200, 5)))
            assert isinstance(error, OperationalError), error
            measured["pooled connection, next write"] = took
            print(f"pooled write failed: {str(error.orig).strip().splitlines()[0]}")

            fresh = _consumer_engine(settings)
            took, error = _timed(lambda: fresh.connect().close())
            fresh.dispose()
            assert isinstance(error, OperationalError), error
            measured["new connection"] = took
            print(f"new connection failed: {str(error.orig).strip().splitlines()[0]}")
        # The path is back: the batch commits, after the server has dropped the orphaned
        # session (whose locks a retry may meet until then), as the writer's retries would.
        restored_at = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            took, error = _timed(
                lambda: store.write(batch, [dataclasses.replace(slow, agent_version="1")])
            )
            if error is None:
                break
            assert isinstance(error, OperationalError), error
            assert time.monotonic() - restored_at < 60, f"no write succeeds again: {error}"
            time.sleep(0.2)
        measured["path back: write committed after"] = time.monotonic() - restored_at
    finally:
        waiting.dispose()
        pooled.dispose()
        with _local(database) as su:
            su.execute("DROP TRIGGER IF EXISTS slow_status ON nodes")
    for what, seconds in measured.items():
        print(f"{what}: {seconds:.2f} s")
    print(f"attempts after the path came back: {attempts}")
    with _local(database) as su:
        assert su.execute("SELECT count(*) FROM readings").fetchone() == (150,)
        assert su.execute("SELECT sum(n) FROM readings_minute").fetchone() == (150,)
    # tcp 3 s: keepalive probing ends the wait at about 4 s; the store holds its connection
    # between batches, so its next write gives up after tcp_user_timeout (3 s); a checkout
    # from the pool would add one reconnect (connect_timeout 2 s).
    assert 2.5 < measured["waiting for a reply"] < 15
    assert 2.5 < measured["pooled connection, next write"] < 15
    assert 1.5 < measured["new connection"] < 6
