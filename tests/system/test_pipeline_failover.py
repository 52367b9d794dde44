"""`pipeline consume` given two brokers fails over within seconds, and loses nothing.

Two independent private RabbitMQ nodes stand in for two nodes of a cluster (a real cluster
replicates the queue; here each node keeps its own, which makes "what the killed node held"
easy to see). The consumer gets both URLs and connects to one of them, chosen at random.
While PostgreSQL holds a lock on ``readings``, 2000 readings go to that node: the consumer
takes its prefetch window (1500, unacknowledged, their batches waiting for the lock) and the
node keeps the other 500. Then the node is killed with kill -9 and readings go to the other
one: the consumer must store them within seconds. The killed node is restarted and must still
hold all 2000; killing the second node sends the consumer back to it, and every reading ends
up stored exactly once, the rollup counting each once although 1500 of them were committed
before their redelivery.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import Database
from tests.harness import RabbitBroker
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import wait_for
from tests.system.test_pipeline import _count, _readings

pytestmark = [pytest.mark.system, pytest.mark.slow]

PREFETCH = 1500
WARM_UP = 300
HELD = 2000  # published into the first node while the database holds the batches back
SURVIVOR = 500  # published into the second node after the first one is killed
FAILOVER_BOUND_S = 10.0


@contextlib.contextmanager
def _two_brokers() -> Iterator[tuple[RabbitBroker, RabbitBroker]]:
    """Two private nodes booted side by side; the second has the first one's pipeline user,
    as the nodes of a cluster share their users."""
    first, second = RabbitBroker(), RabbitBroker()
    second.pipeline = first.pipeline  # users.sh creates it from this at start()
    failures: list[BaseException] = []

    def boot() -> None:
        try:
            second.start()
        except BaseException as exc:  # noqa: BLE001 - reported below, on the test's thread
            failures.append(exc)

    try:
        booting = threading.Thread(target=boot)
        booting.start()
        first.start()
        booting.join()
        if failures:
            raise failures[0]
        yield first, second
    finally:
        first.close()
        second.close()


def _in_range(database: Database, start: int, count: int) -> int:
    with psycopg.connect(database.owner_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM readings WHERE seq >= %s AND seq < %s", (start, start + count)
        ).fetchone()
    return int(row[0]) if row else 0


def _node_port(log: str, event: str) -> int | None:
    """The port of the node named by the last log line with ``event`` (passwords redacted)."""
    found = re.findall(
        rf"^.* {event}.* node=amqp://pipeline:\*\*\*@127\.0\.0\.1:(\d+)/", log, re.MULTILINE
    )
    return int(found[-1]) if found else None


def test_a_killed_node_fails_over_in_seconds_and_loses_nothing(database: Database) -> None:
    with _two_brokers() as (one, two):
        urls = ",".join(f"amqp://127.0.0.1:{b.amqp_port}/%2F" for b in (one, two))
        consumer = ConsumerProcess(
            one,  # its pipeline user is both nodes'
            database.writer_url,
            prefetch=PREFETCH,
            batch_size=500,
            extra_env={"RABBITMQ_URL": urls, "PIPELINE_DB_LOCK_TIMEOUT_S": "0"},
        )
        with consumer:
            wait_for(
                "the consumer consuming",
                lambda: _node_port(consumer.log, "consuming queues=") is not None,
                30,
            )
            port = _node_port(consumer.log, "consuming queues=")
            first, second = (one, two) if port == one.amqp_port else (two, one)
            print(f"consumer connected to the node on port {port}")

            first.publish(_readings(WARM_UP))
            wait_for("warm-up stored", lambda: _in_range(database, 0, WARM_UP) == WARM_UP, 30)
            wait_for("warm-up acknowledged", lambda: first.unacked("readings") == (0, 0), 30)

            # The database holds every batch back: nothing is acknowledged from here on.
            with psycopg.connect(database.owner_url) as lock:
                lock.execute("LOCK TABLE readings IN EXCLUSIVE MODE")
                first.publish(_readings(HELD, start=WARM_UP))
                wait_for(
                    "the prefetch window taken",
                    lambda: first.depth("readings") == HELD - PREFETCH,
                    30,
                )
                killed_at = time.monotonic()
                first.kill()
                lock.commit()  # the held batches commit now, for sessions already gone
            second.publish(_readings(SURVIVOR, start=WARM_UP + HELD))
            wait_for(
                "the second node's readings stored",
                lambda: _in_range(database, WARM_UP + HELD, SURVIVOR) == SURVIVOR,
                30,
                interval=0.05,
            )
            failover_s = time.monotonic() - killed_at
            print(f"kill -9 to the second node's {SURVIVOR} readings stored: {failover_s:.2f} s")
            assert failover_s < FAILOVER_BOUND_S
            assert _node_port(consumer.log, "consuming queues=") == second.amqp_port
            assert _node_port(consumer.log, "broker connection lost") == first.amqp_port

            # The killed node kept what it held: the 1500 delivered but never acknowledged
            # (committed meanwhile: their redelivery is a duplicate) and the 500 never sent.
            first.start()
            first.wait_depth("readings", HELD, timeout=30)
            killed_again_at = time.monotonic()
            second.kill()
            total = WARM_UP + HELD + SURVIVOR
            wait_for("every reading stored", lambda: _count(database)[0] >= total, 60)
            back_s = time.monotonic() - killed_again_at
            print(
                f"kill -9 of the second node to all {total} stored from the first: {back_s:.2f} s"
            )
            wait_for("the first node settled", lambda: first.unacked("readings") == (0, 0), 30)
            rows, distinct, rolled = _count(database)
            print(f"rows={rows} distinct={distinct} rollup_n={rolled} expected={total}")
            assert (rows, distinct, rolled) == (total, total, total)
            assert first.depth("readings.dead") == 0
            assert _node_port(consumer.log, "consuming queues=") == first.amqp_port
            assert consumer.terminate() == 0
            log = consumer.log
            assert one.pipeline.password not in log
            # The prefetch window committed while its node was down; it came back as duplicates.
            duplicates = sum(int(n) for n in re.findall(r" duplicates=(\d+) ", log))
            print(f"duplicates ignored: {duplicates}")
            assert duplicates == PREFETCH
            print("\n".join(line for line in log.splitlines() if "node=" in line))
