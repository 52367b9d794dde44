"""A status the database refuses must not stall the writer (issue 13, item 4).

The decoder already refuses every value of a status that PostgreSQL is known to refuse (NUL
and other control characters in agent_version, read_errors keys that are not ids, counters
beyond bigint), so a CHECK constraint added here by the superuser stands in for a rule the
decoder does not know (a constraint a later migration adds, or one a DBA adds by hand).

Before the fix Store.write retried the readings row by row after the refusal, then applied
the statuses the same way again, which raised again: the writer retried the batch for ever as
"database unavailable", and with no readings in the batch it re-raised at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import Engine

from pipeline.db import make_engine
from pipeline.decode import NodeStatus, Reading
from pipeline.store import Store
from tests.conftest import Database

pytestmark = pytest.mark.system

_REFUSED_VERSION = "9.9.9-refused"


@pytest.fixture
def engine(database: Database) -> Iterator[Engine]:
    with psycopg.connect(database.superuser_url, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE nodes ADD CONSTRAINT stand_in_for_an_unknown_rule"
            f" CHECK (agent_version IS DISTINCT FROM '{_REFUSED_VERSION}')"
        )
    engine = make_engine(database.writer_url)
    yield engine
    engine.dispose()


def _status(node: str, state: str = "online", agent_version: str | None = "1.0") -> NodeStatus:
    return NodeStatus(node, state, None, agent_version, 5.0, 0, 0, {"t1": 0})


def _readings(n: int, node: str = "pi-a") -> list[Reading]:
    at = datetime.now(UTC) - timedelta(minutes=1)
    return [
        Reading(node, "t1", "ds18b20", seq, at + timedelta(seconds=seq), 20.0, None, False)
        for seq in range(n)
    ]


def _nodes(database: Database) -> list[tuple[object, ...]]:
    with psycopg.connect(database.owner_url) as conn:
        return conn.execute("SELECT node, state, agent_version FROM nodes ORDER BY node").fetchall()


def _count(database: Database) -> int:
    with psycopg.connect(database.owner_url) as conn:
        row = conn.execute("SELECT count(*) FROM readings").fetchone()
    return int(row[0]) if row else 0


def test_a_refused_status_is_reported_and_the_rest_commits(
    engine: Engine, database: Database
) -> None:
    statuses = [
        _status("pi-b", agent_version=_REFUSED_VERSION),
        _status("pi-a"),
        _status("pi-b", "offline", agent_version=None),  # merged with the refused one
        _status("pi-c"),
    ]
    result = Store(engine).write(_readings(5), statuses)
    assert (result.inserted, result.duplicates, result.refused) == (5, 0, ())
    assert result.statuses == 2
    assert [index for index, _ in result.refused_statuses] == [0, 2]
    reason = result.refused_statuses[0][1]
    assert reason.startswith("database refused the status: ")
    assert "stand_in_for_an_unknown_rule" in reason
    assert result.refused_statuses[1][1] == reason
    assert _nodes(database) == [("pi-a", "online", "1.0"), ("pi-c", "online", "1.0")]
    assert _count(database) == 5


def test_a_batch_of_statuses_only(engine: Engine, database: Database) -> None:
    result = Store(engine).write(
        [], [_status("pi-a"), _status("pi-b", agent_version=_REFUSED_VERSION)]
    )
    assert result.statuses == 1
    assert [index for index, _ in result.refused_statuses] == [1]
    assert _nodes(database) == [("pi-a", "online", "1.0")]


def test_a_refused_reading_and_a_refused_status_in_one_batch(
    engine: Engine, database: Database
) -> None:
    readings = _readings(3)
    readings[1] = readings[1]._replace(node="pi.a")  # the table's CHECK refuses this id
    result = Store(engine).write(
        readings, [_status("pi-b", agent_version=_REFUSED_VERSION), _status("pi-a")]
    )
    assert (result.inserted, result.duplicates, result.statuses) == (2, 0, 1)
    assert [index for index, _ in result.refused] == [1]
    assert result.refused[0][1].startswith("database refused the row: ")
    assert [index for index, _ in result.refused_statuses] == [0]
    assert _nodes(database) == [("pi-a", "online", "1.0")]
    assert _count(database) == 2


def test_the_next_batch_of_the_refused_node_is_stored(engine: Engine, database: Database) -> None:
    store = Store(engine)
    store.write([], [_status("pi-b", agent_version=_REFUSED_VERSION)])
    result = store.write([], [_status("pi-b", agent_version="1.1")])
    assert (result.statuses, result.refused_statuses) == (1, ())
    assert _nodes(database) == [("pi-b", "online", "1.1")]
