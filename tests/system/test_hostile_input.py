"""Thousands of hostile messages mixed into valid traffic, through one `pipeline consume`.

The hostile messages are published straight into the broker as its administrator (a node's own
user could only publish under its id; the admin can send anything anywhere): random bytes,
truncated and deeply nested JSON, payloads up to the broker's limit, NaN and Infinity, wrong types,
unknown versions, times far in the future and before 1970 and 2000, ids with dots, slashes,
quotes and SQL, a node claiming another node's id, the legacy form with bad fields, text that
is not UTF-8, and empty bodies. Some go through ``amq.topic`` with a ``sensors.`` routing key,
the others straight into the ``readings`` queue through the default exchange.

Every valid reading is stored exactly once; every hostile message is in ``readings.dead``
(byte for byte) with a non-empty ``x-reject-reason``; the consumer never dies and its peak
memory stays bounded; and the ``readings`` table is still there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from pipeline.decode import Reading
from tempmon_contract.wire import reading_payload
from tests.conftest import Database
from tests.harness import RabbitBroker
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import REPO, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.both_brokers]

VALID = 5000
NODES = ("hv-0", "hv-1", "hv-2", "hv-3")
SENSORS = ("s0", "s1", "s2")
MAX_RSS_KB = 200 * 1024
KIB = 1024
# gateway/rabbitmq/rabbitmq.conf's max_message_size: what the broker takes at most.
BROKER_MAX_MESSAGE = int(
    re.search(
        r"^max_message_size\s*=\s*(\d+)",
        (REPO / "gateway/rabbitmq/rabbitmq.conf").read_text(encoding="utf-8"),
        re.M,
    ).group(1)  # type: ignore[union-attr]
)

# (exchange, routing key, body)
Message = tuple[str, str, bytes]
TOPIC = "amq.topic"
QUEUE = ""  # the default exchange: routing key "readings" is the queue itself


def _valid_readings(now: datetime) -> list[Message]:
    base = now - timedelta(minutes=10)
    out = []
    for i in range(VALID):
        node, sensor = NODES[i % len(NODES)], SENSORS[(i // len(NODES)) % len(SENSORS)]
        reading = Reading(
            node=node,
            sensor=sensor,
            kind="simulated",
            seq=i,
            ts=base + timedelta(milliseconds=97 * i),
            temperature_c=round(15 + (i % 200) / 10, 2),
            humidity_pct=None if i % 3 else 45.5,
            time_uncertain=False,
        )
        out.append((TOPIC, f"sensors.{node}.{sensor}", reading_payload(**reading._asdict())))
    return out


def _doc(**changes: Any) -> dict[str, Any]:
    """A valid v1 reading of hv-0/s0 (seq far from the valid ones), with ``changes``."""
    doc: dict[str, Any] = {
        "version": 1,
        "node": "hv-0",
        "sensor": "s0",
        "kind": "simulated",
        "seq": 900_000_000,
        "ts": (datetime.now(UTC) - timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
        "temperature_c": 21.5,
    }
    doc.update(changes)
    return doc


def _js(value: object) -> bytes:
    return json.dumps(value).encode()


def _raw(field: str, literal: str, **changes: Any) -> bytes:
    """A v1 reading whose ``field`` is the raw JSON text ``literal``."""
    marker = "@@raw@@"
    return _js(_doc(**{field: marker}, **changes)).replace(b'"@@raw@@"', literal.encode())


def _crafted() -> list[tuple[str, bytes]]:
    """(routing key, body): one of each kind of hostile message."""
    key = "sensors.hv-0.s0"
    sql = "'; DROP TABLE readings; --"
    m: list[tuple[str, bytes]] = [
        (key, b""),
        (key, b" "),
        (key, b"null"),
        (key, b"[]"),
        (key, b'"a string"'),
        (key, b"42"),
        (key, b"{}"),
        (key, b"{"),
        (key, b"\x00" * 64),
        # Deeply nested: as many brackets as the broker takes, and nesting that fits within the
        # decoder's size limit.
        (key, b"[" * (BROKER_MAX_MESSAGE - 100)),
        (key, b"[" * 4000),
        (key, b'{"a":' * 800 + b"1" + b"}" * 800),
        (key, _raw("temperature_c", "[" * 1500 + "]" * 1500)),
        (key, _raw("node", '{"a":' * 600 + "1" + "}" * 600)),
        # NaN and Infinity tokens, and numbers that overflow to infinity.
        (key, _raw("temperature_c", "NaN")),
        (key, _raw("temperature_c", "Infinity")),
        (key, _raw("temperature_c", "-Infinity")),
        (key, _raw("temperature_c", "1e400")),
        (key, _raw("humidity_pct", "NaN")),
        (key, _raw("seq", "NaN")),
        (key, _raw("seq", "9" * 3000)),
        (key, _raw("temperature_c", "1" + "0" * 3000)),
        # Wrong types.
        (key, _js(_doc(seq="1"))),
        (key, _js(_doc(seq=1.5))),
        (key, _js(_doc(seq=-1))),
        (key, _js(_doc(seq=2**63))),
        (key, _js(_doc(seq=True))),
        (key, _js(_doc(seq=None))),
        (key, _js(_doc(temperature_c="21.5"))),
        (key, _js(_doc(temperature_c=True))),
        (key, _js(_doc(temperature_c=[21.5]))),
        (key, _js(_doc(temperature_c={"value": 21.5}))),
        (key, _js(_doc(temperature_c=151))),
        (key, _js(_doc(kind="ds18b20", temperature_c=130.5))),
        (key, _js(_doc(humidity_pct=101))),
        (key, _js(_doc(kind="ds18b20", humidity_pct=50))),
        (key, _js(_doc(kind="thermocouple"))),
        (key, _js(_doc(kind=None))),
        (key, _js(_doc(ts=1764342000))),
        (key, _js(_doc(ts="yesterday"))),
        (key, _js(_doc(ts="2025-06-01T12:00:00+02:00"))),
        (key, _js(_doc(ts="2025-02-30T12:00:00Z"))),
        (key, _js(_doc(time_uncertain="yes"))),
        (key, _js(_doc(extra=1))),
        (key, _js({k: v for k, v in _doc().items() if k != "seq"})),
        (key, _js({k: v for k, v in _doc().items() if k != "temperature_c"})),
        (key, b'{"version":1,"version":1,' + _js(_doc())[1:]),
        # Unknown versions.
        (key, _js(_doc(version=0))),
        (key, _js(_doc(version=2))),
        (key, _js(_doc(version=-1))),
        (key, _js(_doc(version="1"))),
        (key, _js(_doc(version=1.0))),
        (key, _js(_doc(version=True))),
        (key, _js(_doc(version=None))),
        (key, _js(_doc(version=10**30))),
        # Far-future and pre-1970 / pre-2000 times.
        (key, _js(_doc(ts="9999-12-31T23:59:59Z"))),
        (key, _js(_doc(ts="2100-01-01T00:00:00Z"))),
        (
            key,
            _js(
                _doc(ts=(datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z"))
            ),
        ),
        (key, _js(_doc(ts="1969-12-31T23:59:59Z"))),
        (key, _js(_doc(ts="1970-01-01T00:00:00Z"))),
        (key, _js(_doc(ts="1999-12-31T23:59:59.999Z"))),
        (key, _js(_doc(ts="0001-01-01T00:00:00Z"))),
        # Ids with dots, slashes, quotes and SQL, in the payload and in the routing key.
        (key, _js(_doc(node="hv-0.s0"))),
        (key, _js(_doc(node="hv-0/s0"))),
        (key, _js(_doc(node=sql))),
        (key, _js(_doc(sensor='s0"'))),
        (key, _js(_doc(sensor="x" * 65))),
        (key, _js(_doc(node=""))),
        ("sensors.hv-0.s0.extra", _js(_doc())),
        ("sensors.hv-0", _js(_doc())),
        ("sensors", _js(_doc())),
        ("sensors.hv-0/s0.s0", _js(_doc(node="hv-0/s0"))),
        (f"sensors.{sql}.s0", _js(_doc(node=sql))),
        ("sensors.hv-0'.s0", _js(_doc(node="hv-0'"))),
        ('sensors."hv-0".s0', _js(_doc(node='"hv-0"'))),
        ("sensors.hv-ü.s0", _js(_doc(node="hv-ü"))),
        ("sensors..s0", _js(_doc(node=""))),
        # A node claiming another node's id (and sensor).
        (key, _js(_doc(node="hv-1"))),
        (key, _js(_doc(sensor="s1"))),
        ("sensors.hv-1.s0", _js(_doc(node="hv-0"))),
        # The legacy form with bad fields (no version: decoded as the course's form).
        (key, _js({"id": [1], "data": "2025-06-01 12:00:00", "temperatura": 20})),
        (key, _js({"id": 1.5, "data": "2025-06-01 12:00:00", "temperatura": 20})),
        (key, _js({"id": "../x", "data": "2025-06-01 12:00:00", "temperatura": 20})),
        (key, _js({"id": sql, "data": "2025-06-01 12:00:00", "temperatura": 20})),
        (key, _js({"id": 10**70, "data": "2025-06-01 12:00:00", "temperatura": 20})),
        (key, _js({"id": 1, "data": "yesterday", "temperatura": 20})),
        (key, _js({"id": 1, "data": "2025-13-01 12:00:00", "temperatura": 20})),
        (key, _js({"id": 1, "data": "2025-06-01 12:00:00+25:00", "temperatura": 20})),
        (key, _js({"id": 1, "data": "1960-01-01 00:00:00", "temperatura": 20})),
        (key, _js({"id": 1, "data": "2999-01-01 00:00:00", "temperatura": 20})),
        (key, _js({"id": 1, "data": 1764342000, "temperatura": 20})),
        (key, _js({"id": 1, "data": "2025-06-01 12:00:00", "temperatura": "20"})),
        (key, _js({"id": 1, "data": "2025-06-01 12:00:00", "temperatura": 1000})),
        (key, _js({"id": 1, "data": "2025-06-01 12:00:00", "temperatura": None})),
        (key, _js({"id": 1, "temperatura": 20})),
        (key, _js({"id": 1, "data": "2025-06-01 12:00:00", "temperatura": 20, "x": 1})),
        (key, b'{"id":1,"data":"2025-06-01 12:00:00","temperatura":NaN}'),
        # Not UTF-8.
        (key, b"\xff\xfe" + "{}".encode("utf-16-le")),
        (key, json.dumps(_doc()).encode("utf-16")),
        (key, _js(_doc(node="hv-é")).replace(b"\\u00e9", "é".encode("latin-1"))),
        (key, _js(_doc(node="hv-0")).replace(b"hv-0", b"hv-\xed\xa0\x80")),  # a raw surrogate
        (key, _js(_doc(node="hv-0")).replace(b"hv-0", b"hv-\xc0\xaf")),  # an overlong '/'
        (key, b'{"version":1,"node":"\\ud800","sensor":"s0"}'),
        (key, b"\xef\xbb\xbf" + _js(_doc())),  # a byte order mark
    ]
    # Large payloads the broker still takes (up to its max_message_size; the decoder 4 KiB).
    for size in (5 * KIB, 6 * KIB, BROKER_MAX_MESSAGE - 100):
        body = _js(_doc())
        m.append((key, body + b" " * (size - len(body))))
        m.append((key, b'{"version":1,"node":"' + b"A" * (size - 40) + b'"}'))
    return m


def _hostile(rng: random.Random, valid: list[Message]) -> list[Message]:
    out: list[Message] = []
    for routing_key, body in _crafted():
        out.append((TOPIC, routing_key, body))
        out.append((QUEUE, "readings", body))  # straight into the queue, as the course did
    for _ in range(1000):
        body = rng.randbytes(rng.randrange(1, 600))
        out.append((rng.choice([TOPIC, QUEUE]), "sensors.hv-0.s0", body))
    for _ in range(1000):
        _, routing_key, body = rng.choice(valid)
        cut = rng.randrange(0, len(body))  # a strict prefix of a JSON object is never JSON
        out.append((TOPIC, routing_key, body[:cut]))
    return [(ex, "readings" if ex == QUEUE else key, body) for ex, key, body in out]


def _publish(rabbit: RabbitBroker, messages: list[Message]) -> None:
    """Publish each message persistently as the admin, with confirms."""
    props = pika.BasicProperties(delivery_mode=2)
    with contextlib.closing(rabbit.connection(rabbit.admin)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for exchange, routing_key, body in messages:
            channel.basic_publish(exchange, routing_key, body, props, mandatory=True)


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@pytest.fixture
def consumer(rabbit: RabbitBroker, database: Database) -> Iterator[ConsumerProcess]:
    with ConsumerProcess(rabbit, database.writer_url) as proc:
        yield proc


def _publish_then_sync(channel: BlockingChannel, body: bytes) -> None:
    channel.basic_publish("", "readings", body, pika.BasicProperties(delivery_mode=2))
    channel.basic_publish("", "readings", b"{}")  # in case the refusal arrives only now


def test_broker_refuses_a_message_over_its_size_limit(rabbit: RabbitBroker) -> None:
    too_big = b"x" * (2 * BROKER_MAX_MESSAGE)
    conn = rabbit.connection(rabbit.admin)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        with pytest.raises(
            (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker)
        ) as refused:
            _publish_then_sync(channel, too_big)
    finally:
        if conn.is_open:
            conn.close()
    print(f"{len(too_big)}-byte publish refused: {refused.value!r}")
    assert "size" in str(refused.value).lower() or "406" in str(refused.value)
    time.sleep(1.5)  # quorum queue counts lag about a second
    assert rabbit.depth("readings") == 0, "the refused message was queued after all"
    assert rabbit.depth("readings.dead") == 0


def test_hostile_messages_are_dead_lettered_and_valid_ones_stored_once(
    rabbit: RabbitBroker, database: Database, consumer: ConsumerProcess
) -> None:
    rng = random.Random(20251128)
    valid = _valid_readings(datetime.now(UTC))
    hostile = _hostile(rng, valid)
    hostile_status = [
        ("status.hv-0", b"\xff"),
        ("status.hv-0", _js({"version": 1, "node": "hv-1", "state": "online"})),
        ("status.hv-0", _js({"version": 1, "node": "hv-0", "state": "online", "x": 1})),
        ("status.hv-0", _js({"version": 1, "node": "hv-0", "state": "on fire"})),
        ("status.hv-0", _js({"version": 1, "node": "hv-0", "state": "online", "dropped": -1})),
        (
            "status.hv-0",
            _js({"version": 1, "node": "hv-0", "state": "online", "agent_version": "1\x00"}),
        ),
        (
            "status.hv-0",
            _js(
                {
                    "version": 1,
                    "node": "hv-0",
                    "state": "online",
                    "read_errors": {f"s{i}": 1 for i in range(100)},
                }
            ),
        ),
        ("status.hv-0.extra", _js({"version": 1, "node": "hv-0", "state": "online"})),
    ]
    tagged = [(m, False) for m in valid] + [(m, True) for m in hostile]
    rng.shuffle(tagged)
    print(
        f"publishing valid={len(valid)} hostile={len(hostile)} "
        f"hostile_status={len(hostile_status)} "
        f"hostile_bytes={sum(len(b) for _, _, b in hostile)}"
    )
    _publish(rabbit, [m for m, _ in tagged])
    _publish(rabbit, [(TOPIC, key, body) for key, body in hostile_status])

    def rows() -> tuple[int, int, int]:
        with psycopg.connect(database.owner_url) as conn:
            got = conn.execute(
                "SELECT count(*), count(DISTINCT (node, sensor, seq)) FROM readings"
            ).fetchone()
            rolled = conn.execute("SELECT coalesce(sum(n), 0) FROM readings_minute").fetchone()
        assert got is not None
        assert rolled is not None
        return int(got[0]), int(got[1]), int(rolled[0])

    wait_for("valid readings stored", lambda: rows()[0] >= VALID, 120, 0.25)
    wait_for(
        "hostile messages dead-lettered",
        lambda: rabbit.depth("readings.dead") >= len(hostile),
        120,
        0.25,
    )
    wait_for("readings settled", lambda: rabbit.unacked("readings") == (0, 0), 60, 0.5)
    rabbit.wait_depth("node-status.dead", len(hostile_status), 60)

    assert consumer.alive(), f"the consumer died:\n{consumer.log[-3000:]}"
    peak_kb = _peak_rss_kb(consumer.proc.pid)
    assert consumer.terminate() == 0
    log = consumer.log

    # Valid readings: every one stored once, nothing else stored.
    stored, distinct, rolled = rows()
    with psycopg.connect(database.owner_url) as conn:
        keys = set(conn.execute("SELECT node, sensor, seq FROM readings").fetchall())
        table = conn.execute("SELECT to_regclass('public.readings') IS NOT NULL").fetchone()
    expected = {
        (doc["node"], doc["sensor"], doc["seq"]) for doc in (json.loads(b) for _, _, b in valid)
    }
    dead = rabbit.drain("readings.dead")
    reasons = [(props.headers or {}).get("x-reject-reason") for _, props, _ in dead]
    print(
        f"stored={stored} distinct={distinct} rollup_n={rolled} dead={len(dead)} "
        f"hostile={len(hostile)} peak_rss_mb={peak_kb / 1024:.0f}"
    )
    assert table == (True,), "the readings table is gone"
    assert (stored, distinct, rolled) == (VALID, VALID, VALID)
    assert keys == expected

    # Hostile messages: every one in readings.dead, byte for byte, each with a reason.
    assert len(dead) == len(hostile)
    assert Counter(_digest(body) for _, _, body in dead) == Counter(
        _digest(body) for _, _, body in hostile
    )
    assert all(isinstance(r, str) and r.strip() for r in reasons), "a dead letter has no reason"
    assert rabbit.depth("readings") == 0

    # The consumer stayed up, bounded, and said why it rejected (not a traceback).
    assert peak_kb < MAX_RSS_KB, f"peak RSS {peak_kb / 1024:.0f} MB"
    assert "Traceback" not in log, log[-3000:]
    rejected = sum(int(n) for n in re.findall(r"\brejected=(\d+)", log))
    assert rejected == len(hostile) + len(hostile_status)


def test_a_status_with_an_uptime_beyond_float_range_is_dead_lettered(
    rabbit: RabbitBroker, database: Database, consumer: ConsumerProcess
) -> None:
    # Any node may publish this on its own status topic; 10**400 is a valid JSON number.
    poison = b'{"version":1,"node":"hv-0","state":"online","uptime_s":1' + b"0" * 400 + b"}"
    rabbit.publish([("status.hv-0", poison)])
    rabbit.publish([(key, body) for _, key, body in _valid_readings(datetime.now(UTC))[:100]])
    wait_for(
        "the poison dead-lettered, or the consumer gone",
        lambda: rabbit.depth("node-status.dead") >= 1 or not consumer.alive(),
        60,
        0.25,
    )
    assert consumer.alive(), f"the consumer died on one status message:\n{consumer.log[-2000:]}"
    [(_, props, body)] = rabbit.drain("node-status.dead")
    assert body == poison
    assert "uptime_s" in props.headers["x-reject-reason"]
    with psycopg.connect(database.owner_url) as conn:
        wait_for(
            "readings stored",
            lambda: conn.execute("SELECT count(*) FROM readings").fetchone() == (100,),
            60,
        )


def test_a_routing_key_that_is_not_utf8_is_dead_lettered(
    rabbit: RabbitBroker, database: Database, consumer: ConsumerProcess
) -> None:
    """An AMQP publisher (not a node: MQTT topics are UTF-8) may send any octets as a routing
    key. The consumer read it as bytes (the fast path gave such a delivery to pika, which
    gives the key over as bytes), and signing the copy's headers, which need text, ended the
    process on every redelivery. Both paths now read it as text with backslash escapes."""
    body = json.dumps(
        {
            "version": 1,
            "node": "hv-0",
            "sensor": "s0",
            "kind": "ds18b20",
            "seq": 1,
            "ts": datetime.now(UTC).isoformat(),
            "temperature_c": 20.0,
        }
    ).encode()
    with contextlib.closing(rabbit.connection(rabbit.admin)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish("amq.topic", b"sensors.\xff.s0", body)  # type: ignore[arg-type]
    rabbit.publish([(key, b) for _, key, b in _valid_readings(datetime.now(UTC))[:100]])
    wait_for(
        "the message dead-lettered, or the consumer gone",
        lambda: rabbit.depth("readings.dead") >= 1 or not consumer.alive(),
        60,
        0.25,
    )
    assert consumer.alive(), consumer.log[-2000:]
    assert "broker connection lost" not in consumer.log
    [(_, props, dead_body)] = rabbit.drain("readings.dead")
    assert dead_body == body
    assert props.headers["x-original-routing-key"] == "sensors.\\xff.s0"
    assert props.headers["x-reject-reason"]
    with psycopg.connect(database.owner_url) as conn:
        wait_for(
            "readings stored",
            lambda: conn.execute("SELECT count(*) FROM readings").fetchone() == (100,),
            60,
        )
