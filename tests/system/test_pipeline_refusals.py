"""What the database refuses reaches the dead-letter queue with its reason, through the
consumer: a sequence number reused with different content, and a status a constraint refuses.
Before, the first was dropped silently as a duplicate and the second stalled the writer for
good (every later batch waited behind it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pipeline.decode import Reading
from tempmon_contract.wire import reading_payload
from tests.conftest import Database
from tests.harness import RabbitBroker
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import wait_for

pytestmark = pytest.mark.system


def _reading(
    seq: int, temperature_c: float, *, node: str = "pi-1", age: timedelta = timedelta(minutes=5)
) -> tuple[str, bytes]:
    at = datetime.now(UTC) - age
    reading = Reading(
        node=node,
        sensor="t1",
        kind="simulated",
        seq=seq,
        ts=at.replace(microsecond=0) + timedelta(seconds=seq),
        temperature_c=temperature_c,
        humidity_pct=None,
        time_uncertain=False,
    )
    return f"sensors.{node}.t1", reading_payload(**reading._asdict())


def _rows(database: Database, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(database.owner_url) as conn:
        return list(conn.execute(sql))


def _dead_lettered(
    rabbit: RabbitBroker,
    database: Database,
    consumer: ConsumerProcess,
    message: tuple[str, bytes],
    *,
    stored: int,
) -> str:
    """Wait for ``message`` as the one dead letter and ``stored`` rows, all settled; stop the
    consumer and return the dead letter's reason."""
    rabbit.wait_depth("readings.dead", 1, timeout=60)
    wait_for(f"{stored} rows", lambda: len(_rows(database, "SELECT 1 FROM readings")) == stored, 60)
    wait_for("readings settled", lambda: rabbit.unacked("readings") == (0, 0), 30)
    assert consumer.terminate() == 0
    [(_method, props, body)] = rabbit.drain("readings.dead")
    assert body == message[1]
    return str(props.headers["x-reject-reason"])


def test_a_reused_sequence_number_is_dead_lettered_not_dropped(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    first = _reading(5, 21.5)
    rabbit.publish([first])
    consumer = ConsumerProcess(rabbit, database.writer_url)
    consumers.append(consumer)
    wait_for("the first reading", lambda: len(_rows(database, "SELECT 1 FROM readings")) == 1, 60)
    reused = _reading(5, 30.25)  # another card of pi-1 that restarted its counter
    rabbit.publish([first, reused, _reading(6, 22.0)])  # a true duplicate, a reuse, a new one
    reason = _dead_lettered(rabbit, database, consumer, reused, stored=2)
    assert reason.startswith("sequence number reused with different content")
    assert "seq=5" in reason
    assert "21.5" in reason
    assert "30.25" in reason
    assert _rows(database, "SELECT seq, temperature_c FROM readings ORDER BY seq") == [
        (5, 21.5),
        (6, 22.0),
    ]
    assert "conflicts=1" in consumer.log
    assert "duplicates=1" in consumer.log


def test_a_reading_older_than_the_raw_retention_is_dead_lettered_with_its_reason(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    """A node that kept readings offline for longer than the retention (issue 15): no
    partition holds their day any more."""
    old = _reading(1, 19.0, age=timedelta(days=45))
    rabbit.publish([_reading(2, 20.0), old, _reading(3, 21.0)])
    consumer = ConsumerProcess(rabbit, database.writer_url)
    consumers.append(consumer)
    reason = _dead_lettered(rabbit, database, consumer, old, stored=2)
    assert " is older than the readings the database keeps (from " in reason
    assert "raw retention 30 days): not stored" in reason
    assert _rows(database, "SELECT seq FROM readings ORDER BY seq") == [(2,), (3,)]


def test_a_status_the_database_refuses_is_dead_lettered_and_the_writer_goes_on(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    # A rule of the database that the decoder does not know about.
    with psycopg.connect(database.superuser_url, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE nodes ADD CONSTRAINT test_refused_version"
            " CHECK (agent_version IS DISTINCT FROM 'refuse-me')"
        )
    refused = json.dumps(
        {"version": 1, "node": "pi-bad", "state": "online", "agent_version": "refuse-me"}
    ).encode()
    good = json.dumps(
        {"version": 1, "node": "pi-good", "state": "online", "agent_version": "1.0"}
    ).encode()
    rabbit.publish([("status.pi-bad", refused), ("status.pi-good", good), _reading(1, 20.0)])
    consumer = ConsumerProcess(rabbit, database.writer_url)
    consumers.append(consumer)
    rabbit.wait_depth("node-status.dead", 1, timeout=60)
    # The writer is not stuck behind the refused status: later batches land.
    rabbit.publish([_reading(2, 20.5), _reading(3, 21.0)])
    wait_for("3 readings", lambda: len(_rows(database, "SELECT 1 FROM readings")) == 3, 60)
    wait_for("statuses settled", lambda: rabbit.unacked("node-status") == (0, 0), 30)
    wait_for("readings settled", lambda: rabbit.unacked("readings") == (0, 0), 30)
    assert consumer.terminate() == 0
    assert _rows(database, "SELECT node, state FROM nodes ORDER BY node") == [("pi-good", "online")]
    [(_method, props, body)] = rabbit.drain("node-status.dead")
    assert body == refused
    assert props.headers["x-reject-reason"].startswith("database refused the status")
    assert "test_refused_version" in props.headers["x-reject-reason"]
    assert "database unavailable" not in consumer.log
