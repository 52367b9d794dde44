"""Node status never goes backwards (issue 13, item 2).

An agent's Last Will (`offline`) and its reconnect's `online` can be committed in either order:
two consumer replicas write them in separate transactions, and RabbitMQ publishes the old
connection's Last Will only when the new connection takes the client id over, so even one
consumer can see the old will after the new `online`. With the connection's `session` on every
status, an `offline` applies only to its own connection and a late `online` never undoes its
own connection's `offline`; statuses without a session apply in order, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from pipeline.db import make_engine
from pipeline.decode import NodeStatus
from pipeline.store import BatchResult, Store
from tests.conftest import Database

pytestmark = pytest.mark.system

OLD = "00000000000000a1"  # the connection that died
NEW = "00000000000000b2"  # the reconnect


def _status(state: str, session: str | None, **counters: Any) -> NodeStatus:
    return NodeStatus(
        node="pi-a",
        state=state,
        ts=None,
        agent_version=counters.get("agent_version"),
        uptime_s=counters.get("uptime_s"),
        outbox_depth=counters.get("outbox_depth"),
        dropped=None,
        read_errors=None,
        session=session,
    )


@pytest.fixture
def engine(database: Database) -> Iterator[Engine]:
    engine = make_engine(database.writer_url)
    yield engine
    engine.dispose()


def _node(database: Database) -> tuple[Any, ...] | None:
    with psycopg.connect(database.owner_url) as conn:
        return conn.execute(
            "SELECT state, session, agent_version, outbox_depth FROM nodes WHERE node = 'pi-a'"
        ).fetchone()


@pytest.mark.parametrize("first", ["will", "online"])
def test_will_and_reconnect_in_either_commit_order_end_online(
    engine: Engine, database: Database, first: str
) -> None:
    """Two Store.write calls, as two replicas would commit them, in both orders."""
    store = Store(engine)
    store.write([], [_status("online", OLD)])
    will, online = _status("offline", OLD), _status("online", NEW, agent_version="2.0")
    for status in (will, online) if first == "will" else (online, will):
        assert store.write([], [status]) == BatchResult(inserted=0, duplicates=0, statuses=1)
    assert _node(database) == ("online", NEW, "2.0", None)


def _waiting_on_a_lock(database: Database, count: int) -> bool:
    with psycopg.connect(database.superuser_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND usename = 'pipeline'"
            " AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0] == count)


def _wait(what: str, check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("first", ["will", "online"])
def test_concurrent_transactions_in_either_order_end_online(
    engine: Engine, database: Database, first: str
) -> None:
    """Two transactions queued on the node's row lock commit in the order they queued: the
    guard must hold on the row version each one finds when it finally gets the lock."""
    store = Store(engine)
    store.write([], [_status("online", OLD)])
    will, online = _status("offline", OLD), _status("online", NEW)
    errors: list[BaseException] = []

    def write(status: NodeStatus) -> None:
        try:
            store.write([], [status])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = []
    with psycopg.connect(database.owner_url) as holder:
        holder.execute("SELECT 1 FROM nodes WHERE node = 'pi-a' FOR UPDATE")
        for n, status in enumerate((will, online) if first == "will" else (online, will), 1):
            thread = threading.Thread(target=write, args=(status,))
            thread.start()
            threads.append(thread)
            _wait(f"{n} writer(s) blocked", lambda n=n: _waiting_on_a_lock(database, n))
        holder.commit()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert _node(database) == ("online", NEW, None, None)


def test_a_late_heartbeat_never_undoes_its_own_connections_death(
    engine: Engine, database: Database
) -> None:
    store = Store(engine)
    store.write([], [_status("online", OLD, outbox_depth=1)])
    store.write([], [_status("offline", OLD)])
    result = store.write([], [_status("online", OLD, outbox_depth=9, agent_version="1.0")])
    assert result.statuses == 1  # handled (acknowledged), but older than the stored row
    assert _node(database) == ("offline", OLD, None, 1)
    store.write([], [_status("online", NEW)])  # the reconnect does
    assert _node(database) == ("online", NEW, None, 1)


def test_an_offline_applies_to_its_own_connection(engine: Engine, database: Database) -> None:
    store = Store(engine)
    store.write([], [_status("online", NEW, outbox_depth=3)])
    store.write([], [_status("offline", NEW)])
    assert _node(database) == ("offline", NEW, None, 3)


def test_a_first_status_of_a_node_is_stored_whatever_it_is(
    engine: Engine, database: Database
) -> None:
    Store(engine).write([], [_status("offline", OLD)])
    assert _node(database) == ("offline", OLD, None, None)
    Store(engine).write([], [_status("online", NEW)])
    assert _node(database) == ("online", NEW, None, None)


def test_statuses_without_a_session_apply_in_order_as_before(
    engine: Engine, database: Database
) -> None:
    store = Store(engine)
    for state in ("online", "offline", "online", "offline"):
        store.write([], [_status(state, None, agent_version="0.9")])
        assert _node(database) == (state, None, "0.9", None)
    # A row written by a newer agent takes an older agent's statuses as they come.
    store.write([], [_status("online", NEW)])
    store.write([], [_status("offline", None)])
    assert _node(database) == ("offline", None, "0.9", None)
    # And the other way round: a row without a session takes any connection's offline.
    store.write([], [_status("online", None)])
    store.write([], [_status("offline", OLD)])
    assert _node(database) == ("offline", OLD, "0.9", None)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        pytest.param(
            [_status("online", NEW, agent_version="2.0"), _status("offline", OLD)],
            ("online", NEW, "2.0", None),
            id="old will after the new online",
        ),
        pytest.param(
            [_status("offline", OLD), _status("online", NEW, agent_version="2.0")],
            ("online", NEW, "2.0", None),
            id="old will before the new online",
        ),
        pytest.param(
            [_status("online", OLD, outbox_depth=4), _status("offline", OLD)],
            ("offline", OLD, None, 4),
            id="heartbeat then its own will: counters kept",
        ),
        pytest.param(
            [_status("offline", OLD), _status("online", OLD, outbox_depth=9)],
            ("offline", OLD, None, None),
            id="will then a late heartbeat of the same connection",
        ),
        pytest.param(
            [_status("online", None), _status("offline", None, outbox_depth=2)],
            ("offline", None, None, 2),
            id="no sessions: the later one wins",
        ),
    ],
)
def test_statuses_of_one_node_in_one_batch_follow_the_same_rule(
    engine: Engine, database: Database, batch: list[NodeStatus], expected: tuple[Any, ...]
) -> None:
    store = Store(engine)
    store.write([], [_status("online", OLD)])
    result = store.write([], batch)
    assert result.statuses == len(batch)
    assert _node(database) == expected
