"""A reused sequence number is not a duplicate (issue 13, item 1).

The natural key (node, sensor, seq) makes a redelivered reading a no-op. A reading whose key is
stored with different content is something else: a node that lost its sequence counter, or two
nodes sharing an id. Store.write reports it as refused (the consumer dead-letters it with the
reason) and counts it in ``conflicts``, never in ``duplicates``; the stored row stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event

from pipeline import store as store_module
from pipeline.db import make_engine
from pipeline.decode import Reading
from pipeline.store import BatchResult, Store
from tests.conftest import Database

pytestmark = pytest.mark.system

_AT = datetime.now(UTC).replace(microsecond=250_000) - timedelta(minutes=5)


def _reading(seq: int, **changes: Any) -> Reading:
    base = Reading(
        node="pi-1",
        sensor="t1",
        kind="dht22",
        seq=seq,
        ts=_AT + timedelta(seconds=seq),
        temperature_c=21.5,
        humidity_pct=40.0,
        time_uncertain=False,
    )
    return base._replace(**changes)


@pytest.fixture
def engine(database: Database) -> Iterator[Engine]:
    engine = make_engine(database.writer_url)
    yield engine
    engine.dispose()


def _stored(database: Database) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.owner_url) as conn:
        return conn.execute(
            "SELECT seq, kind, ts, temperature_c, humidity_pct, time_uncertain FROM readings"
            " ORDER BY seq"
        ).fetchall()


def _rolled_up(database: Database) -> int:
    with psycopg.connect(database.owner_url) as conn:
        row = conn.execute("SELECT coalesce(sum(n), 0) FROM readings_minute").fetchone()
    return int(row[0]) if row else 0


def test_a_redelivered_batch_is_all_duplicates_and_no_conflict(engine: Engine) -> None:
    """received_at differs between the two commits: it is not content."""
    store = Store(engine)
    batch = [_reading(seq) for seq in range(50)] + [_reading(50, humidity_pct=None, kind="cpu")]
    assert store.write(batch) == BatchResult(inserted=51, duplicates=0, statuses=0)
    assert store.write(batch) == BatchResult(inserted=0, duplicates=51, statuses=0)


def test_a_batch_with_some_stored_keys_falls_back_and_counts_each_reading_once(
    engine: Engine, database: Database
) -> None:
    """A new batch is tried with a plain INSERT; one with a stored key fails that without a
    trace and is written ON CONFLICT DO NOTHING, on the same connection, which goes on."""
    sent: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement in (store_module._WRITE_NEW_READINGS, store_module._WRITE_READINGS):
            sent.append("plain" if statement == store_module._WRITE_NEW_READINGS else "on conflict")

    event.listen(engine, "before_cursor_execute", record)
    store = Store(engine)
    assert store.write([_reading(seq) for seq in range(50)]) == BatchResult(
        inserted=50, duplicates=0, statuses=0
    )
    assert sent == ["plain"]
    # A partial redelivery: ten stored keys among forty new ones.
    assert store.write([_reading(seq) for seq in range(40, 90)]) == BatchResult(
        inserted=40, duplicates=10, statuses=0
    )
    assert sent == ["plain", "plain", "on conflict"]
    assert store.write([_reading(seq) for seq in range(90, 100)]) == BatchResult(
        inserted=10, duplicates=0, statuses=0
    )
    assert sent == ["plain", "plain", "on conflict", "plain"]
    assert [row[0] for row in _stored(database)] == list(range(100))
    assert _rolled_up(database) == 100


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"temperature_c": 30.25}, id="temperature_c"),
        pytest.param({"ts": _AT + timedelta(days=1)}, id="ts"),
        pytest.param({"ts": _AT + timedelta(seconds=7, microseconds=1)}, id="ts-by-1us"),
        pytest.param({"humidity_pct": None}, id="humidity_pct-null"),
        pytest.param({"humidity_pct": 40.5}, id="humidity_pct"),
        pytest.param({"kind": "simulated"}, id="kind"),
        pytest.param({"time_uncertain": True}, id="time_uncertain"),
    ],
)
def test_a_reused_sequence_number_is_refused_not_counted_as_duplicate(
    engine: Engine, database: Database, change: dict[str, Any]
) -> None:
    store = Store(engine)
    store.write([_reading(7), _reading(8)])
    before = _stored(database)
    reused = _reading(7, **change)
    result = store.write([_reading(9), reused, _reading(8)])
    assert [index for index, _ in result.refused] == [1]
    assert (result.inserted, result.duplicates, result.conflicts) == (1, 1, 1)
    reason = result.refused[0][1]
    print(reason)
    assert reason.startswith(
        "sequence number reused with different content: node=pi-1 sensor=t1 seq=7; stored ts="
    )
    stored_part, new_part = reason.split("; stored ")[1].split("; this message ")
    (name, value), *_ = change.items()
    if name not in {"ts", "temperature_c"}:
        shown = {None: "null", True: "true", False: "false"}.get(value, str(value))
        assert f"{name}={shown}" in new_part
        assert f"{name}=" in stored_part
    assert "temperature_c=21.5" in stored_part
    assert f"temperature_c={reused.temperature_c}" in new_part
    after = _stored(database)
    assert after[:2] == before  # 7 (and 8) as they were
    assert [row[0] for row in after] == [7, 8, 9]
    assert _rolled_up(database) == 3


def test_the_conflict_reason_shows_both_versions(engine: Engine) -> None:
    store = Store(engine)
    store.write([_reading(5)])
    result = store.write([_reading(5, temperature_c=-3.0, ts=_AT + timedelta(hours=1))])
    assert result.refused == (
        (
            0,
            (
                "sequence number reused with different content: node=pi-1 sensor=t1 seq=5; "
                f"stored ts={(_AT + timedelta(seconds=5)).strftime('%Y-%m-%dT%H:%M:%S')}.250Z "
                "temperature_c=21.5; "
                f"this message ts={(_AT + timedelta(hours=1)).strftime('%Y-%m-%dT%H:%M:%S')}.250Z "
                "temperature_c=-3.0"
            ),
        ),
    )


def test_one_key_twice_in_one_batch_with_different_content(
    engine: Engine, database: Database
) -> None:
    """Both rows are new: one wins the insert, the other is the conflict, not a duplicate."""
    store = Store(engine)
    first, second = _reading(3, temperature_c=20.0), _reading(3, temperature_c=25.0)
    result = store.write([first, _reading(4), second, _reading(4)])
    assert len(result.refused) == 1
    assert (result.inserted, result.duplicates, result.conflicts) == (2, 1, 1)
    ((index, reason),) = result.refused
    stored = {row[0]: row[3] for row in _stored(database)}
    loser = (first, second)[index // 2]
    assert stored[3] != loser.temperature_c
    assert f"this message ts={loser.ts.strftime('%Y-%m-%dT%H:%M:%S')}" in reason
    assert _rolled_up(database) == 2


def test_conflicts_are_found_in_the_row_by_row_path_too(engine: Engine) -> None:
    """A row the database refuses sends the batch row by row; conflicts are still told apart."""
    store = Store(engine)
    store.write([_reading(1), _reading(2)])
    bad = _reading(3, node="pi.1")  # a node id the table's CHECK refuses
    batch = [_reading(2, temperature_c=99.0), bad, _reading(1), _reading(4)]
    result = store.write(batch)
    reasons = dict(result.refused)
    assert set(reasons) == {0, 1}
    assert (result.inserted, result.duplicates, result.conflicts) == (1, 1, 1)
    assert reasons[0].startswith("sequence number reused with different content: ")
    assert "seq=2" in reasons[0]
    assert reasons[1].startswith("database refused the row: ")


def test_a_conflict_does_not_hold_back_the_statuses_or_other_rows(
    engine: Engine, database: Database
) -> None:
    from pipeline.decode import NodeStatus  # noqa: PLC0415

    store = Store(engine)
    store.write([_reading(1)])
    status = NodeStatus("pi-1", "online", None, "1.0", 1.0, 0, 0, None)
    result = store.write([_reading(1, temperature_c=0.0), _reading(2)], [status])
    assert [index for index, _ in result.refused] == [0]
    assert (result.inserted, result.conflicts, result.statuses) == (1, 1, 1)
    with psycopg.connect(database.owner_url) as conn:
        assert conn.execute("SELECT state FROM nodes").fetchall() == [("online",)]


# --- Pressure (the BME280): content like humidity ------------------------------------------------


def _bme280(seq: int, **changes: Any) -> Reading:
    return _reading(seq, kind="bme280", pressure_hpa=1013.25)._replace(**changes)


def test_a_redelivered_bme280_batch_is_all_duplicates(engine: Engine, database: Database) -> None:
    store = Store(engine)
    batch = [_bme280(seq) for seq in range(20)] + [_bme280(20, pressure_hpa=None)]
    assert store.write(batch) == BatchResult(inserted=21, duplicates=0, statuses=0)
    assert store.write(batch) == BatchResult(inserted=0, duplicates=21, statuses=0)
    with psycopg.connect(database.owner_url) as conn:
        assert conn.execute(
            "SELECT count(*), count(pressure_hpa), sum(pressure_hpa) FROM readings"
        ).fetchone() == (21, 20, 20 * 1013.25)
        assert conn.execute("SELECT sum(n), sum(n_p) FROM readings_minute").fetchone() == (21, 20)


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        pytest.param(1013.25, 1013.5, id="other-value"),
        pytest.param(1013.25, None, id="now-null"),
        pytest.param(None, 1013.25, id="was-null"),
    ],
)
def test_a_reused_sequence_number_with_other_pressure_is_a_conflict(
    engine: Engine, database: Database, stored: float | None, new: float | None
) -> None:
    store = Store(engine)
    store.write([_bme280(7, pressure_hpa=stored)])
    result = store.write([_bme280(7, pressure_hpa=new), _bme280(8)])
    assert (result.inserted, result.duplicates, result.conflicts) == (1, 0, 1)
    ((index, reason),) = result.refused
    assert index == 0
    shown = {None: "null"}
    stored_part, new_part = reason.split("; stored ")[1].split("; this message ")
    assert f"pressure_hpa={shown.get(stored, stored)}" in stored_part
    assert f"pressure_hpa={shown.get(new, new)}" in new_part
    assert "humidity_pct" not in reason  # the same in both: not shown
    with psycopg.connect(database.owner_url) as conn:
        assert conn.execute("SELECT seq, pressure_hpa FROM readings ORDER BY seq").fetchall() == [
            (7, stored),
            (8, 1013.25),
        ]
    assert _rolled_up(database) == 2
