"""`pipeline consume` against the real broker and database: exactly once, whatever fails."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pipeline.decode import Reading
from pipeline.store import BatchResult, Store
from tempmon_contract.wire import reading_payload
from tests.conftest import Database
from tests.harness import RabbitBroker
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import free_port, wait_for
from tests.system.test_replay_identity import broker_info

pytestmark = pytest.mark.system


def _readings(
    n: int, *, nodes: int = 4, sensors: int = 3, start: int = 0, at: datetime | None = None
) -> list[tuple[str, bytes]]:
    """``n`` valid v1 readings spread over nodes and sensors, seq unique per node."""
    at = at or datetime.now(UTC) - timedelta(minutes=5)
    out = []
    for i in range(start, start + n):
        node, sensor = f"node-{i % nodes}", f"s{(i // nodes) % sensors}"
        reading = Reading(
            node=node,
            sensor=sensor,
            kind="simulated",
            seq=i,
            ts=at + timedelta(milliseconds=i),
            temperature_c=20 + (i % 100) / 10,
            humidity_pct=None,
            time_uncertain=False,
        )
        out.append((f"sensors.{node}.{sensor}", reading_payload(**reading._asdict())))
    return out


def _count(database: Database) -> tuple[int, int, int]:
    """(rows, distinct keys, readings counted by the rollup)."""
    with psycopg.connect(database.owner_url) as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (node, sensor, seq)) FROM readings"
        ).fetchone() or (0, 0)
        rolled = conn.execute("SELECT coalesce(sum(n), 0) FROM readings_minute").fetchone()
    return int(rows), int(distinct), int(rolled[0] if rolled else 0)


def _wait_rows(database: Database, expected: int, timeout: float = 120) -> None:
    wait_for(f"{expected} rows", lambda: _count(database)[0] >= expected, timeout, interval=0.2)


def _assert_exactly(database: Database, rabbit: RabbitBroker, n: int) -> None:
    rows, distinct, rolled = _count(database)
    print(f"rows={rows} distinct={distinct} rollup_n={rolled} expected={n}")
    assert (rows, distinct, rolled) == (n, n, n)
    wait_for("readings queue settled", lambda: rabbit.unacked("readings") == (0, 0), 30)
    assert rabbit.depth("readings.dead") == 0


def _start(
    consumers: list[ConsumerProcess], rabbit: RabbitBroker, database: Database, **kw: int
) -> ConsumerProcess:
    consumer = ConsumerProcess(rabbit, database.writer_url, **kw)
    consumers.append(consumer)
    return consumer


def test_stream_is_stored_once_and_acknowledged(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    messages = _readings(3000)
    rabbit.publish(messages)
    rabbit.publish(messages[:200])  # republished by a client that retried
    consumer = _start(consumers, rabbit, database)
    _wait_rows(database, 3000)
    wait_for("queue drained", lambda: rabbit.unacked("readings") == (0, 0), 30)
    # The management UI's consumer lists name the pipeline (README, quick start).
    wait_for(
        "the pipeline's consumer tags in the management API",
        lambda: (
            _consumer_tags(rabbit)
            == {
                ("readings", "tempmon-pipeline.readings"),
                ("node-status", "tempmon-pipeline.status"),
            }
        ),
        30,
        interval=0.5,
    )
    assert consumer.terminate() == 0
    _assert_exactly(database, rabbit, 3000)
    assert "duplicates=" in consumer.log
    # The process ran with its collector tuned (pipeline.consumer.tune_collector).
    assert "garbage collector tuned frozen_objects=" in consumer.log


def _consumer_tags(rabbit: RabbitBroker) -> set[tuple[str, str]]:
    """(queue, consumer tag) of every consumer, from the management API."""
    request = urllib.request.Request(f"http://127.0.0.1:{rabbit.management_port}/api/consumers")
    password_manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    password_manager.add_password(
        None, request.full_url, rabbit.admin.username, rabbit.admin.password
    )
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(password_manager))
    with opener.open(request, timeout=10) as response:
        consumers = json.load(response)
    return {(c["queue"]["name"], c["consumer_tag"]) for c in consumers}


@pytest.mark.both_brokers
def test_poison_is_dead_lettered_with_reason_and_the_next_reading_stored(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    [good] = _readings(1)
    rabbit.publish([("sensors.node-0.s0", b"\xff\xfe not json"), good])
    bad_temp = json.loads(good[1])
    bad_temp.update(seq=99, temperature_c=300.0)
    rabbit.publish([(good[0], json.dumps(bad_temp).encode())])
    _start(consumers, rabbit, database)
    _wait_rows(database, 1)
    rabbit.wait_depth("readings.dead", 2)
    dead = rabbit.drain("readings.dead")
    reasons = [props.headers["x-reject-reason"] for _, props, _ in dead]
    assert "payload" in reasons[0]
    assert "temperature_c" in reasons[1]
    assert "300" in reasons[1]
    assert [props.headers["x-original-routing-key"] for _, props, _ in dead] == [
        "sensors.node-0.s0",
        "sensors.node-0.s0",
    ]
    assert dead[0][2] == b"\xff\xfe not json"
    assert _count(database)[0] == 1
    wait_for("readings settled", lambda: rabbit.unacked("readings") == (0, 0), 30)


@pytest.mark.slow
def test_kill_9_mid_stream_then_restart_stores_exactly_20000(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    messages = _readings(20_000, nodes=5, sensors=4)
    publisher = threading.Thread(target=rabbit.publish, args=(messages,))
    publisher.start()
    first = _start(consumers, rabbit, database, batch_size=200, prefetch=600)
    _wait_rows(database, 4000)
    first.kill()
    killed_at = _count(database)[0]
    _start(consumers, rabbit, database, batch_size=200, prefetch=600)
    publisher.join(120)
    _wait_rows(database, 20_000, timeout=180)
    print(f"killed at rows={killed_at}")
    _assert_exactly(database, rabbit, 20_000)


@pytest.mark.slow
def test_two_consumers_compete_for_one_queue(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    # Few sensors, one minute of timestamps: both consumers upsert the same rollup rows.
    messages = _readings(12_000, nodes=2, sensors=2)
    a = _start(consumers, rabbit, database, batch_size=100, prefetch=300)
    b = _start(consumers, rabbit, database, batch_size=100, prefetch=300)
    rabbit.publish(messages)
    rabbit.publish(messages[::7])  # duplicates that may land on either consumer
    _wait_rows(database, 12_000)
    wait_for("queue drained", lambda: rabbit.unacked("readings") == (0, 0), 60)
    assert a.terminate() == 0
    assert b.terminate() == 0
    assert "deadlock" not in (a.log + b.log).lower()
    _assert_exactly(database, rabbit, 12_000)
    assert "inserted=" in a.log
    assert "inserted=" in b.log


@pytest.mark.slow
def test_broker_killed_mid_stream(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    rabbit.publish(_readings(20_000))
    consumer = _start(consumers, rabbit, database, batch_size=100, prefetch=300)
    _wait_rows(database, 2000)
    rabbit.kill()
    time.sleep(2)
    rabbit.start()
    _wait_rows(database, 20_000, timeout=180)
    assert consumer.alive()
    assert "broker connection lost" in consumer.log
    _assert_exactly(database, rabbit, 20_000)


@pytest.mark.slow
def test_database_crash_mid_stream_holds_then_resumes(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    rabbit.publish(_readings(20_000))
    consumer = _start(consumers, rabbit, database, batch_size=100, prefetch=300)
    _wait_rows(database, 2000)
    database.server.kill()
    # The consumer holds its batches: nothing acknowledged while the database is down, so the
    # whole prefetch window ends up unacknowledged. The broker's counts lag by up to its stats
    # interval (5 s), and a fast consumer may have had nothing unacknowledged at the last one.
    wait_for(
        "the prefetch window held unacknowledged",
        lambda: rabbit.unacked("readings")[1] == 300,
        20,
        interval=0.5,
    )
    time.sleep(2)
    assert rabbit.unacked("readings")[1] == 300
    database.server.start()
    _wait_rows(database, 20_000, timeout=180)
    assert consumer.alive()
    assert "database unavailable" in consumer.log
    _assert_exactly(database, rabbit, 20_000)


def test_sigterm_commits_acknowledges_and_exits_0(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    rabbit.publish(_readings(10_000))
    consumer = _start(consumers, rabbit, database, batch_size=250, prefetch=1000, batch_ms=2000)
    _wait_rows(database, 500)
    assert consumer.terminate(timeout=60) == 0
    rows = _count(database)[0]
    # Every committed row was acknowledged and every other message is back in the queue
    # (quorum queue counts lag about a second behind the acks).
    wait_for("queue settled", lambda: rabbit.unacked("readings") == (10_000 - rows, 0), 15)
    print(f"after SIGTERM rows={rows} ready={10_000 - rows}")
    assert "stopping on SIGTERM" in consumer.log
    _start(consumers, rabbit, database)
    _wait_rows(database, 10_000)
    _assert_exactly(database, rabbit, 10_000)


def test_legacy_course_messages_land(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    # A recent day: readings older than the raw retention (30 days) are refused.
    day = (datetime.now(UTC) - timedelta(days=1)).replace(
        hour=10, minute=0, second=0, microsecond=0
    )
    ms = int(day.timestamp()) * 1000
    rabbit.publish(
        [
            (
                "sensors.lab-pi.3",
                json.dumps(
                    {"id": 3, "data": f"{day:%Y-%m-%d %H:%M:%S}", "temperatura": 23.5}
                ).encode(),
            )
        ]
    )
    # The course's sensors published with pika straight into the queue.
    rabbit.publish(
        [
            (
                "readings",
                json.dumps(
                    {"id": "7", "data": f"{day:%Y-%m-%dT%H:%M}:01Z", "temperatura": 19}
                ).encode(),
            )
        ],
        exchange="",
    )
    _start(consumers, rabbit, database)
    _wait_rows(database, 2)
    with psycopg.connect(database.owner_url) as conn:
        rows = conn.execute(
            "SELECT node, sensor, kind, seq, ts, temperature_c FROM readings ORDER BY sensor"
        ).fetchall()
    assert rows == [
        ("lab-pi", "3", "legacy", ms, day, 23.5),
        ("legacy", "7", "legacy", ms + 1000, day + timedelta(seconds=1), 19.0),
    ]


def test_node_status_online_heartbeat_and_last_will(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    online = {"version": 1, "node": "pi-a", "state": "online", "ts": now}
    heartbeat = {
        **online,
        "agent_version": "1.2.3",
        "uptime_s": 61.5,
        "outbox_depth": 4,
        "dropped": 0,
        "read_errors": {"t1": 2},
    }
    will = {"version": 1, "node": "pi-a", "state": "offline"}
    rabbit.publish([("status.pi-a", json.dumps(m).encode()) for m in (online, heartbeat)])
    _start(consumers, rabbit, database)
    wait_for("node row", lambda: _node(database) is not None, 30)
    wait_for("heartbeat applied", lambda: (_node(database) or {}).get("outbox_depth") == 4, 30)
    rabbit.publish([("status.pi-a", json.dumps(will).encode())])
    wait_for("offline", lambda: (_node(database) or {}).get("state") == "offline", 30)
    node = _node(database)
    assert node is not None
    assert node["agent_version"] == "1.2.3"  # the Last Will keeps the last known counters
    assert node["read_errors"] == {"t1": 2}
    rabbit.publish([("status.pi-a", b'{"state": "confused"}')])
    rabbit.wait_depth("node-status.dead", 1)


def _node(database: Database) -> dict[str, object] | None:
    with psycopg.connect(database.owner_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM nodes WHERE node = 'pi-a'")
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d.name for d in cur.description or []], row, strict=True))


@pytest.mark.both_brokers
def test_dead_letters_list_and_replay(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    # A valid reading rejected by an older consumer: the broker dead-letters it by policy.
    [good] = _readings(1)
    rabbit.publish([good, ("sensors.node-0.s0", b"[1, 2]")])
    with rabbit.connection() as conn:
        channel = conn.channel()
        method, _, _ = channel.basic_get("readings")
        assert method is not None
        channel.basic_nack(method.delivery_tag, requeue=False)
    rabbit.wait_depth("readings.dead", 1)
    env = {
        "RABBITMQ_URL": f"amqp://127.0.0.1:{rabbit.amqp_port}/%2F",
        "RABBITMQ_USER": rabbit.pipeline.username,
        "RABBITMQ_PASSWORD": rabbit.pipeline.password,
    }
    consumer = _start(consumers, rabbit, database)
    rabbit.wait_depth("readings.dead", 2)
    listed = json.loads(_pipeline(env, "dead", "list", "--json"))
    # The consumer's copy is signed; the broker's own record proves the first one's origin
    # only on RabbitMQ 4: 3.10 keeps an x-death its publisher wrote (test_replay_identity.py).
    assert listed[1]["routing_key"] == "sensors.node-0.s0"
    assert listed[1]["origin"] == "signed"
    assert "JSON array" in listed[1]["reason"]
    assert "no reason recorded" in listed[0]["reason"]
    assert rabbit.depth("readings.dead") == 2  # listing leaves them in place
    dry_run = _pipeline(env, "dead", "replay", "--dry-run")
    if not broker_info(rabbit).writes_its_own_x_death:
        assert listed[0]["origin"] == "unverified"
        assert listed[0]["routing_key"] == ""
        assert "keeps an x-death its publisher wrote" in listed[0]["origin_note"]
        assert "0 would now be stored, 1 would be rejected again, 1 would stay" in dry_run
        out = _pipeline(env, "dead", "replay")
        assert "replayed 1 message(s)" in out
        assert "left 1 message(s)" in out
        # Both are still dead: the unverified one in place, the unusable one afresh.
        dead: list[tuple[Any, Any, bytes]] = []

        def replayed_copy_is_back() -> bool:
            dead.extend(rabbit.drain("readings.dead"))
            return any("x-replayed" in (p.headers or {}) for _, p, _ in dead)

        wait_for("the replayed copy back in readings.dead", replayed_copy_is_back, 30)
        assert len(dead) == 2
        assert _count(database)[0] == 0
        [props] = [p for _, p, _ in dead if "x-replayed" in (p.headers or {})]
    else:
        assert listed[0]["origin"] == "broker"
        assert listed[0]["routing_key"] == "sensors.node-0.s0"
        assert "1 would now be stored, 1 would be rejected" in dry_run
        assert "replayed 2" in _pipeline(env, "dead", "replay")
        _wait_rows(database, 1)
        rabbit.wait_depth("readings.dead", 1)  # the unusable one is back, with a fresh reason
        [(_, props, _)] = rabbit.drain("readings.dead")
    assert props.headers["x-replayed"] == 1
    assert props.headers["x-original-routing-key"] == "sensors.node-0.s0"
    assert "JSON array" in props.headers["x-reject-reason"]
    assert consumer.terminate() == 0


def _pipeline(env: dict[str, str], *args: str) -> str:
    import os  # noqa: PLC0415

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_metrics_endpoint_counts(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    port = free_port()
    rabbit.publish(_readings(500))
    rabbit.publish([("sensors.node-0.s0", b"{}")])
    _start(consumers, rabbit, database, metrics_port=port)
    _wait_rows(database, 500)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    wait_for("metrics", lambda: "pipeline_readings_inserted_total 500.0" in scrape(), 30)
    text = scrape()
    assert 'pipeline_messages_rejected_total{queue="readings"} 1.0' in text
    assert 'pipeline_messages_consumed_total{queue="readings"} 501.0' in text
    assert "pipeline_commit_seconds_bucket" in text
    assert "pipeline_batch_size_count" in text
    assert "pipeline_database_up 1.0" in text


@contextlib.contextmanager
def _in_process_consumer(
    rabbit: RabbitBroker, database: Database, store_class: type[Store], **settings: int
) -> Iterator[None]:
    """``consume_forever`` in a thread, writing through ``store_class``; stopped on leaving."""
    from pipeline.config import ConsumerSettings  # noqa: PLC0415
    from pipeline.consumer import consume_forever  # noqa: PLC0415
    from pipeline.db import make_engine  # noqa: PLC0415

    config = ConsumerSettings(
        rabbitmq_url=rabbit.amqp_url(),
        database_url=database.writer_url,
        log_interval_s=1,
        **settings,  # type: ignore[arg-type]
    )
    engine = make_engine(database.writer_url, pool_size=config.db_writers + 1)
    stop = threading.Event()
    runner = threading.Thread(
        target=consume_forever, args=(config, store_class(engine), stop), daemon=True
    )
    runner.start()
    try:
        yield
    finally:
        stop.set()
        runner.join(60)
        engine.dispose()


def test_a_writer_bug_ends_the_session_and_loses_nothing(
    rabbit: RabbitBroker, database: Database
) -> None:
    """A batch that fails for an unexpected reason must not be acked by the next batch."""

    class FlakyStore(Store):
        calls = 0

        def write(self, readings, statuses=()) -> BatchResult:  # type: ignore[no-untyped-def]
            FlakyStore.calls += 1
            if FlakyStore.calls == 2:
                raise ZeroDivisionError("a bug in the second batch")
            return super().write(readings, statuses)

    rabbit.publish(_readings(3000))
    with _in_process_consumer(
        rabbit, database, FlakyStore, prefetch=600, batch_size=200, batch_ms=50
    ):
        _wait_rows(database, 3000, timeout=60)
        wait_for("queue drained", lambda: rabbit.unacked("readings") == (0, 0), 30)
    assert FlakyStore.calls > 2
    _assert_exactly(database, rabbit, 3000)


def test_a_batch_committed_before_an_earlier_one_acknowledges_nothing_past_it(
    rabbit: RabbitBroker, database: Database
) -> None:
    """Two writer connections: the first batch to reach the database hangs there while the
    other writer commits the batches after it. Their multiple ack must not reach over the hung
    batch (a crash would then lose it): every delivery from the hung batch on stays
    unacknowledged until it commits, then everything is acknowledged."""

    first_entered, release = threading.Event(), threading.Event()
    lock = threading.Lock()
    hung: list[int] = []  # the sequence numbers of the batch that hangs

    class FirstBatchHangs(Store):
        def write(self, readings, statuses=()) -> BatchResult:  # type: ignore[no-untyped-def]
            with lock:
                first = not first_entered.is_set()
                if first:
                    hung.extend(r.seq for r in readings)
                    first_entered.set()
            if first:
                assert release.wait(90)
            return super().write(readings, statuses)

    readings = _readings(3000)  # seq 0..2999, delivered in this order
    rabbit.publish(readings[:500])
    consumer = _in_process_consumer(
        rabbit, database, FirstBatchHangs, prefetch=3000, batch_size=500, batch_ms=50, db_writers=2
    )
    with consumer:
        try:
            assert first_entered.wait(30)
            rabbit.publish(readings[500:])
            # Every other batch commits meanwhile, before and after the hung one.
            _wait_rows(database, 3000 - len(hung), timeout=60)
            print(f"hung batch: seq {min(hung)}..{max(hung)}")
            # The broker's counts lag by up to its stats interval (5 s): wait for them, then
            # look again after one more interval, when any wrong acknowledgement would show.
            held = (0, 3000 - min(hung))
            wait_for("the counts to settle", lambda: rabbit.unacked("readings") == held, 20)
            time.sleep(6)
            assert rabbit.unacked("readings") == held
            release.set()
            _wait_rows(database, 3000, timeout=60)
            wait_for("queue drained", lambda: rabbit.unacked("readings") == (0, 0), 30)
        finally:
            release.set()
    _assert_exactly(database, rabbit, 3000)


def test_the_store_keeps_its_connection_and_sends_one_statement_per_batch(
    database: Database,
) -> None:
    """A batch of readings is one statement on a connection the store keeps: no checkout
    (and its ping) per batch, and nothing else sent through a cursor but the read of which
    days the partitions hold, once a minute."""
    from sqlalchemy import event  # noqa: PLC0415

    from pipeline.db import make_engine  # noqa: PLC0415

    engine = make_engine(database.writer_url)
    checkouts: list[object] = []
    statements: list[str] = []
    event.listen(engine, "checkout", lambda *_: checkouts.append(1))
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    store = Store(engine)
    try:
        now = datetime.now(UTC)
        for i in range(5):
            batch = [
                Reading("node-0", "s0", "simulated", i * 10 + j, now, 20.0, None, False)
                for j in range(10)
            ]
            assert store.write(batch).inserted == 10
        assert len(checkouts) == 1
        # Besides, the days the partitions hold are read once a minute.
        days = [sql for sql in statements if sql.lstrip().startswith("SELECT nullif(stored_from")]
        assert len(days) == 1
        batches = [sql for sql in statements if sql not in days]
        assert len(batches) == 5
        assert all("INSERT INTO readings" in sql for sql in batches)
    finally:
        store.close()
        engine.dispose()
    assert _count(database)[0] == 50


@pytest.mark.both_brokers
def test_looking_at_dead_letters_never_loses_them(rabbit: RabbitBroker) -> None:
    """`pipeline dead list` and `dead replay --dry-run` take each dead letter without
    acknowledging it; on RabbitMQ 4 that counts as a delivery, and a quorum queue's default
    delivery limit (20) would drop it. The dead-letter queues' policy lifts the limit: after
    12 listings and 12 dry runs of each dead-letter queue (24 deliveries of each message),
    every dead letter is still there, unchanged."""
    from pipeline.deadletters import list_dead, replay_dead  # noqa: PLC0415

    bodies = {"readings.dead": b'{"kept": 1}', "node-status.dead": b'{"kept": 2}'}
    for queue, body in bodies.items():
        rabbit.publish([(queue, body)], exchange="")
        rabbit.wait_depth(queue, 1)
    for _ in range(12):
        for queue, body in bodies.items():
            [dead] = list_dead(rabbit.amqp_url(), queue, 10, key=None)
            assert (dead.size, dead.preview) == (len(body), body.decode())
            result = replay_dead(rabbit.amqp_url(), queue, 10, key=None, dry_run=True)
            assert result.replayed == 0
    time.sleep(1.5)  # quorum queue counts lag about a second
    for queue, body in bodies.items():
        assert rabbit.depth(queue) == 1
        [dead] = list_dead(rabbit.amqp_url(), queue, 10, key=None)
        assert (dead.size, dead.preview) == (len(body), body.decode())
