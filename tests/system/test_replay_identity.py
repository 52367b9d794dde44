"""A node cannot get its messages stored under another node's id through the dead letters.

The attack: node ``pi-mallory`` may publish only ``sensors.pi-mallory.*`` and
``status.pi-mallory``. It writes ``x-original-routing-key: sensors.pi-victim.t1`` (and a forged
``x-death``) into its own message's headers, as MQTT 5 user properties (RabbitMQ 3.13 and later
turn them into AMQP headers) or over AMQP, which a node's account may use to publish to
``amq.topic`` too. The broker dead-letters the message on its own when it expires with no
consumer running, keeping those headers. ``pipeline dead replay`` then used to put it back
under the victim's key, and the consumer trusted that key: a reading or an ``offline`` status
stored under ``pi-victim``.

What the brokers do with a forged ``x-death`` (this module shows it; pipeline.origin relies on
it): RabbitMQ 4.0 replaces it with its own record when it dead-letters; RabbitMQ 3.10 keeps it
and only raises the count of an entry with the same queue and reason, so its record proves
nothing. Hence, after a replay, a node's identity comes only from the pipeline's signature or
from RabbitMQ 4's own record, and a message whose origin cannot be proved stays dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pika
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.origin import BrokerInfo, derive_key, sign
from tests.conftest import Database
from tests.harness import NodeCredentials, RabbitBroker
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import wait_for

pytestmark = pytest.mark.system

VICTIM = "pi-victim"
MALLORY = "pi-mallory"


# --- helpers ------------------------------------------------------------------------------------


def _now_text(offset: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) + offset).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _legacy(sensor: str, offset: timedelta = timedelta(minutes=-1)) -> bytes:
    """A reading in the course's legacy form: no node in the payload, only in the routing key."""
    when = (datetime.now(UTC) + offset).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return json.dumps({"id": sensor, "data": when, "temperatura": 21.5}).encode()


def _v1(node: str, sensor: str, seq: int, offset: timedelta = timedelta(minutes=-1)) -> bytes:
    return json.dumps(
        {
            "version": 1,
            "node": node,
            "sensor": sensor,
            "kind": "simulated",
            "seq": seq,
            "ts": _now_text(offset),
            "temperature_c": 21.5,
        }
    ).encode()


def _status(node: str, state: str, offset: timedelta | None = None) -> bytes:
    doc: dict[str, Any] = {"version": 1, "node": node, "state": state}
    if offset is not None:
        doc["ts"] = _now_text(offset)
    return json.dumps(doc).encode()


def mqtt_publish(
    rabbit: RabbitBroker,
    creds: NodeCredentials,
    messages: list[tuple[str, bytes]],
    *,
    v5: bool = False,
    user_properties: list[tuple[str, str]] | None = None,
    expiry_s: int | None = None,
) -> None:
    """Publish as a node over MQTT (QoS 1) and wait for every PUBACK."""
    protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds.username, protocol=protocol)
    client.username_pw_set(creds.username, creds.password)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", rabbit.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(15), "no CONNACK within 15 s"
        for topic, payload in messages:
            props = None
            if v5:
                props = Properties(PacketTypes.PUBLISH)
                if user_properties:
                    props.UserProperty = user_properties
                if expiry_s is not None:
                    props.MessageExpiryInterval = expiry_s
            info = client.publish(topic, payload, qos=1, properties=props)
            info.wait_for_publish(15)
            assert info.is_published(), f"no PUBACK for {topic}"
    finally:
        client.disconnect()
        client.loop_stop()


def _pipeline(rabbit: RabbitBroker, *args: str) -> str:
    """`pipeline ...` with the pipeline's AMQP account, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env={
            **os.environ,
            "RABBITMQ_URL": f"amqp://127.0.0.1:{rabbit.amqp_port}/%2F",
            "RABBITMQ_USER": rabbit.pipeline.username,
            "RABBITMQ_PASSWORD": rabbit.pipeline.password,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _replay_all(rabbit: RabbitBroker) -> tuple[str, str]:
    return (
        _pipeline(rabbit, "dead", "replay"),
        _pipeline(rabbit, "dead", "replay", "--queue", "node-status.dead"),
    )


def broker_info(rabbit: RabbitBroker) -> BrokerInfo:
    """The broker's product and version, as `pipeline dead list` and `replay` read them."""
    with contextlib.closing(rabbit.connection()) as conn:
        return BrokerInfo.from_server_properties(conn._impl.server_properties)


def _rows(database: Database, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.owner_url) as conn:
        return list(conn.execute(sql).fetchall())  # type: ignore[arg-type]


def _stored_nodes(database: Database) -> dict[str, set[str]]:
    """Every node id anything was stored under, by table."""
    return {
        table: {str(row[0]) for row in _rows(database, f"SELECT DISTINCT node FROM {table}")}  # noqa: S608 - fixed table names
        for table in ("readings", "readings_minute", "sensors", "nodes")
    }


def _settled(rabbit: RabbitBroker) -> None:
    """Wait until the consumer has taken and settled everything in its queues."""

    def idle() -> bool:
        return rabbit.unacked("readings") == (0, 0) and rabbit.unacked("node-status") == (0, 0)

    wait_for("readings and node-status settled", idle, 60, interval=0.3)
    time.sleep(1.5)  # quorum queue counts lag about a second
    wait_for("readings and node-status settled", idle, 60, interval=0.3)


def _assert_victim_untouched(database: Database) -> None:
    stored = _stored_nodes(database)
    for table, nodes in stored.items():
        assert VICTIM not in nodes, f"stored under {VICTIM} in {table}: {stored}"


def _reasons(rabbit: RabbitBroker, queue: str) -> list[str]:
    return [
        str((props.headers or {}).get("x-reject-reason")) for _, props, _ in rabbit.drain(queue)
    ]


def _start(
    consumers: list[ConsumerProcess], rabbit: RabbitBroker, database: Database
) -> ConsumerProcess:
    consumer = ConsumerProcess(rabbit, database.writer_url)
    consumers.append(consumer)
    wait_for("the consumer consuming", lambda: "consuming queues=" in consumer.log, 60)
    return consumer


# --- the attack over MQTT 5 --------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", ["rabbitmq4"], indirect=True)
def test_mqtt5_forged_origin_is_never_replayed_as_another_node(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    rabbit.add_node(VICTIM)
    mallory = rabbit.add_node(MALLORY)
    forged = [
        ("x-original-routing-key", f"sensors.{VICTIM}.t1"),
        ("x-original-queue", "readings"),
        ("x-death", "forged"),
        ("x-first-death-queue", "readings"),
        ("x-pipeline-signature", "v1:00000000:" + "0" * 64),
    ]
    # No consumer runs: each message expires after 1 s and the broker dead-letters it,
    # keeping the headers mallory wrote.
    mqtt_publish(
        rabbit, mallory, [(f"sensors/{MALLORY}/t1", _legacy("t1"))],
        v5=True, user_properties=forged, expiry_s=1,
    )  # fmt: skip
    # Posing as a copy the pipeline made: not even a broker record then.
    mqtt_publish(
        rabbit, mallory, [(f"sensors/{MALLORY}/t2", _v1(VICTIM, "t2", 1))],
        v5=True, expiry_s=1,
        user_properties=[
            *forged[:2],
            ("x-reject-reason", "temporary database error, replay me"),
            ("x-rejected-by", "pipeline 1.0"),
        ],
    )  # fmt: skip
    mqtt_publish(
        rabbit, mallory, [(f"status/{MALLORY}", _status(VICTIM, "offline"))],
        v5=True, expiry_s=1,
        user_properties=[
            ("x-original-routing-key", f"status.{VICTIM}"),
            ("x-original-queue", "node-status"),
        ],
    )  # fmt: skip
    rabbit.wait_depth("readings.dead", 2)
    rabbit.wait_depth("node-status.dead", 1)
    listed_before = _pipeline(rabbit, "dead", "list", "--json")

    consumer = _start(consumers, rabbit, database)
    readings_out, status_out = _replay_all(rabbit)
    _settled(rabbit)
    _assert_victim_untouched(database)

    # The legacy reading went back under the key mallory really published it under.
    assert _rows(database, "SELECT node, sensor FROM readings") == [(MALLORY, "t1")]
    assert "replayed 1 message(s) from readings.dead" in readings_out
    assert "left 1 message(s) in readings.dead" in readings_out
    assert "replayed 1 message(s) from node-status.dead" in status_out
    listed = json.loads(listed_before)
    by_origin = {d["origin"]: d for d in listed}
    assert by_origin["broker"]["routing_key"] == f"sensors.{MALLORY}.t1"
    assert "x-death written by RabbitMQ 4" in by_origin["broker"]["origin_note"]
    assert by_origin["unverified"]["routing_key"] == ""
    assert by_origin["unverified"]["claimed_routing_key"] == f"sensors.{VICTIM}.t1"
    assert "copied here by a pipeline" in by_origin["unverified"]["origin_note"]
    assert "not verified" in by_origin["unverified"]["reason"]
    # The status came back dead under mallory's own key, where it does not match its payload.
    rabbit.wait_depth("node-status.dead", 1)
    [status_reason] = _reasons(rabbit, "node-status.dead")
    assert f"does not match the topic's node '{MALLORY}'" in status_reason
    assert rabbit.depth("readings.dead") == 1  # the unverified one, still dead
    assert consumer.terminate() == 0


# --- the attack over AMQP, on both brokers ------------------------------------------------------


@pytest.mark.both_brokers
def test_amqp_forged_x_death_is_never_replayed_as_another_node(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    rabbit.add_node(VICTIM)
    mallory = rabbit.add_node(MALLORY)
    # An entry with the queue and reason the broker will record: RabbitMQ 3.10 merges its own
    # into it (count + 1) and keeps these routing keys.
    forged_death = {
        "count": 1,
        "reason": "expired",
        "queue": "readings",
        "time": datetime(2025, 1, 1, tzinfo=UTC),
        "exchange": "amq.topic",
        "routing-keys": [f"sensors.{VICTIM}.t1"],
    }
    props = pika.BasicProperties(
        delivery_mode=2,
        expiration="100",
        headers={
            "x-death": [forged_death],
            "x-original-routing-key": f"sensors.{VICTIM}.t1",
            "x-original-queue": "readings",
        },
    )
    with contextlib.closing(rabbit.connection(mallory)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish("amq.topic", f"sensors.{MALLORY}.t1", _legacy("t1"), props)
    rabbit.wait_depth("readings.dead", 1)
    [(_, dead_props, _)] = _peek(rabbit, "readings.dead")
    deaths = dead_props.headers["x-death"]
    # What pipeline.origin assumes of each version, checked: RabbitMQ 3.10 keeps the
    # publisher's entry with its routing keys; RabbitMQ 4 writes its own record.
    broker = broker_info(rabbit)
    forged_kept = any(d["routing-keys"] == [f"sensors.{VICTIM}.t1"] for d in deaths)
    print(f"{broker}: x-death after dead-lettering: {deaths}")
    assert forged_kept is not broker.writes_its_own_x_death, (str(broker), deaths)
    if broker.writes_its_own_x_death:
        assert [d["routing-keys"] for d in deaths] == [[f"sensors.{MALLORY}.t1"]], deaths

    consumer = _start(consumers, rabbit, database)
    out = _pipeline(rabbit, "dead", "replay")
    _settled(rabbit)
    _assert_victim_untouched(database)
    if not broker.writes_its_own_x_death:
        assert "replayed 0 message(s)" in out
        assert "left 1 message(s) in readings.dead" in out
        [listed] = json.loads(_pipeline(rabbit, "dead", "list", "--json"))
        assert listed["origin"] == "unverified"
        assert listed["claimed_routing_key"] == f"sensors.{VICTIM}.t1"
        assert "keeps an x-death its publisher wrote" in listed["origin_note"]
        assert _rows(database, "SELECT node FROM readings") == []
        assert rabbit.depth("readings.dead") == 1
    else:
        assert "replayed 1 message(s)" in out
        assert _rows(database, "SELECT node, sensor FROM readings") == [(MALLORY, "t1")]
        assert rabbit.depth("readings.dead") == 0
    assert consumer.terminate() == 0


def _peek(rabbit: RabbitBroker, queue: str) -> list[tuple[Any, Any, bytes]]:
    """The ready messages of ``queue``, left in place."""
    with contextlib.closing(rabbit.connection()) as conn:
        channel = conn.channel()
        seen = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return seen
            seen.append((method, props, body))


# --- the consumer: a claim put back into its queue must be signed -------------------------------


@pytest.mark.both_brokers
def test_a_message_put_back_with_an_unproved_claim_is_refused(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    key = derive_key(rabbit.pipeline.password)  # the default: from the AMQP password
    claim = f"sensors.{VICTIM}.t1"

    def signed(body: bytes, routing_key: str, signing_key: bytes = key) -> str:
        return sign(signing_key, routing_key=routing_key, queue="readings", body=body)

    bodies = [_legacy(f"e{n}") for n in range(5)]
    unproved = {
        "no signature": (bodies[0], {}),
        "a forged signature": (bodies[1], {"x-pipeline-signature": "v1:00000000:" + "0" * 64}),
        "another key": (bodies[2], {"x-pipeline-signature": signed(bodies[2], claim, b"k" * 32)}),
        "another body": (bodies[3], {"x-pipeline-signature": signed(bodies[4], claim)}),
    }
    for body, extra in unproved.values():
        headers = {"x-original-routing-key": claim, "x-original-queue": "readings", **extra}
        rabbit.publish([("readings", body)], exchange="", headers=headers)
    # What `pipeline dead replay` puts back: signed with the pipeline's key.
    proved = f"sensors.{MALLORY}.e4"
    rabbit.publish(
        [("readings", bodies[4])],
        exchange="",
        headers={
            "x-original-routing-key": proved,
            "x-original-queue": "readings",
            "x-pipeline-signature": signed(bodies[4], proved),
        },
    )
    consumer = _start(consumers, rabbit, database)
    _settled(rabbit)
    _assert_victim_untouched(database)
    assert _rows(database, "SELECT node, sensor FROM readings") == [(MALLORY, "e4")]
    rabbit.wait_depth("readings.dead", len(unproved))
    # Dead with a reason, unsigned: listed as unverified, and never replayed.
    listed = json.loads(_pipeline(rabbit, "dead", "list", "--json"))
    assert [d["origin"] for d in listed] == ["unverified"] * len(unproved)
    out = _pipeline(rabbit, "dead", "replay")
    assert f"left {len(unproved)} message(s)" in out
    reasons = _reasons(rabbit, "readings.dead")
    assert len(reasons) == len(unproved)
    for reason in reasons:
        assert reason.startswith(f"x-original-routing-key: '{claim}' is not proved"), reason
    assert consumer.terminate() == 0


# --- the normal flow still works ----------------------------------------------------------------


@pytest.mark.both_brokers
def test_a_rejected_reading_replayed_later_lands_under_its_own_node(
    rabbit: RabbitBroker, database: Database, consumers: list[ConsumerProcess]
) -> None:
    """A node whose clock ran 10 s too far ahead: its reading and status are rejected as in the
    future; replayed once that time has come, they are stored under the node that sent them."""
    node = rabbit.add_node("pi-ahead")
    consumer = _start(consumers, rabbit, database)
    ahead = timedelta(seconds=310)  # the decoder allows 300 s
    sent_at = time.monotonic()
    mqtt_publish(
        rabbit,
        node,
        [
            ("sensors/pi-ahead/t1", _v1("pi-ahead", "t1", 7, offset=ahead)),
            ("sensors/pi-ahead/t2", _legacy("t2", offset=ahead)),
            ("status/pi-ahead", _status("pi-ahead", "online", offset=ahead)),
        ],
    )
    rabbit.wait_depth("readings.dead", 2)
    rabbit.wait_depth("node-status.dead", 1)
    listed = json.loads(_pipeline(rabbit, "dead", "list", "--json"))
    assert sorted(d["routing_key"] for d in listed) == [
        "sensors.pi-ahead.t1",
        "sensors.pi-ahead.t2",
    ]
    assert {d["origin"] for d in listed} == {"signed"}
    assert all("in the future" in d["reason"] for d in listed), listed
    # Rejected, so decoded before the times were 300 s ahead; now let them come within 300 s.
    time.sleep(max(0.0, 12 - (time.monotonic() - sent_at)))
    readings_out, status_out = _replay_all(rabbit)
    assert "replayed 2 message(s)" in readings_out
    assert "replayed 1 message(s)" in status_out
    _settled(rabbit)
    assert sorted(_rows(database, "SELECT node, sensor FROM readings")) == [
        ("pi-ahead", "t1"),
        ("pi-ahead", "t2"),
    ]
    assert _rows(database, "SELECT node, state FROM nodes") == [("pi-ahead", "online")]
    assert rabbit.depth("readings.dead") == 0
    assert rabbit.depth("node-status.dead") == 0
    assert consumer.terminate() == 0
