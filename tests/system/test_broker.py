"""The broker booted from gateway/rabbitmq/: topology, MQTT ingest, and who may do what."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pika
import pika.exceptions
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.harness import NodeCredentials, RabbitBroker

pytestmark = [pytest.mark.system, pytest.mark.both_brokers]


class MqttProbe:
    """A paho-mqtt 2.x client that records what the broker answered."""

    def __init__(self, broker: RabbitBroker, creds: NodeCredentials | None, client_id: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        if creds is not None:
            self.client.username_pw_set(creds.username, creds.password)
        self.connack: ReasonCode | None = None
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.acked: set[int] = set()
        self.suback: list[ReasonCode] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", broker.mqtt_port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack = rc
        self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: ReasonCode, _p: Any) -> None:
        self.disconnected.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: ReasonCode, _p: Any) -> None:
        self.acked.add(mid)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self.suback = codes

    def wait_connack(self) -> ReasonCode:
        assert self.connected.wait(10), "no CONNACK within 10 s"
        assert self.connack is not None
        return self.connack

    def publish_and_wait(self, topic: str, payload: bytes, timeout: float = 10) -> bool:
        """True if the broker PUBACKed the QoS 1 publish."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if info.mid in self.acked:
                return True
            if self.disconnected.is_set():
                return False
            time.sleep(0.02)
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def _reading(node: str, sensor: str, seq: int) -> bytes:
    return json.dumps(
        {
            "version": 1,
            "node": node,
            "sensor": sensor,
            "kind": "simulated",
            "seq": seq,
            "ts": "2026-01-01T00:00:00Z",
            "temperature_c": 21.5,
        }
    ).encode()


def test_topology_comes_from_definitions(rabbit: RabbitBroker) -> None:
    queues = {
        line.split("\t")[0]: line.split("\t")[1:]
        for line in rabbit.ctl(
            "list_queues", "--no-table-headers", "name", "type", "durable", "policy"
        ).splitlines()
    }
    assert queues["readings"] == ["quorum", "true", "readings-dead-lettering"]
    assert queues["node-status"] == ["quorum", "true", "node-status-dead-lettering"]
    assert queues["readings.dead"][:2] == ["quorum", "true"]
    bindings = rabbit.ctl(
        "list_bindings", "--no-table-headers", "source_name", "destination_name", "routing_key"
    )
    assert "amq.topic\treadings\tsensors.#" in bindings
    assert "amq.topic\tnode-status\tstatus.#" in bindings
    users = rabbit.ctl("list_users", "--no-table-headers")
    assert "guest" not in {line.split("\t")[0] for line in users.splitlines()}


def test_node_reading_lands_in_readings_persistent(rabbit: RabbitBroker) -> None:
    creds = rabbit.add_node("pi-kitchen")
    probe = MqttProbe(rabbit, creds, "pi-kitchen")
    try:
        assert probe.wait_connack() == 0
        assert probe.publish_and_wait(
            "sensors/pi-kitchen/28-0316a2b4c5ff", _reading("pi-kitchen", "28-0316a2b4c5ff", 1)
        )
    finally:
        probe.close()
    rabbit.wait_depth("readings", 1)
    [(method, props, body)] = rabbit.drain("readings")
    assert method.routing_key == "sensors.pi-kitchen.28-0316a2b4c5ff"
    assert props.delivery_mode == 2, "a QoS 1 publish must arrive persistent"
    assert json.loads(body)["seq"] == 1


def test_puback_means_durable_across_broker_kill(rabbit: RabbitBroker) -> None:
    creds = rabbit.add_node("pi-cellar")
    probe = MqttProbe(rabbit, creds, "pi-cellar")
    try:
        assert probe.wait_connack() == 0
        for seq in range(1, 51):
            assert probe.publish_and_wait("sensors/pi-cellar/t1", _reading("pi-cellar", "t1", seq))
    finally:
        probe.close()
    rabbit.kill()
    rabbit.start()
    rabbit.wait_depth("readings", 50)
    seqs = sorted(json.loads(body)["seq"] for _, _, body in rabbit.drain("readings"))
    assert seqs == list(range(1, 51))


def test_anonymous_mqtt_is_refused(rabbit: RabbitBroker) -> None:
    probe = MqttProbe(rabbit, None, "anonymous-probe")
    try:
        assert probe.wait_connack().is_failure
    finally:
        probe.close()


def test_wrong_password_is_refused(rabbit: RabbitBroker) -> None:
    creds = rabbit.add_node("pi-garage")
    probe = MqttProbe(rabbit, NodeCredentials(creds.username, "not-" + creds.password), "x")
    try:
        assert probe.wait_connack().is_failure
    finally:
        probe.close()


def test_node_cannot_publish_under_another_id(rabbit: RabbitBroker) -> None:
    rabbit.add_node("pi-attic")
    intruder = rabbit.add_node("pi-intruder")
    probe = MqttProbe(rabbit, intruder, "pi-intruder")
    try:
        assert probe.wait_connack() == 0
        assert not probe.publish_and_wait("sensors/pi-attic/t1", _reading("pi-attic", "t1", 1))
        assert probe.disconnected.wait(10), "the broker should close the offending connection"
    finally:
        probe.close()
    time.sleep(1.5)  # quorum queue counts lag about a second
    assert rabbit.depth("readings") == 0
    # Its own status (the Last Will it never set, so nothing) and its own readings still work.
    probe = MqttProbe(rabbit, intruder, "pi-intruder")
    try:
        assert probe.wait_connack() == 0
        assert probe.publish_and_wait("sensors/pi-intruder/t1", _reading("pi-intruder", "t1", 1))
        assert probe.publish_and_wait("status/pi-intruder", b'{"state": "online"}')
    finally:
        probe.close()
    rabbit.wait_depth("readings", 1)
    rabbit.wait_depth("node-status", 1)


def test_node_cannot_subscribe(rabbit: RabbitBroker) -> None:
    creds = rabbit.add_node("pi-curious")
    probe = MqttProbe(rabbit, creds, "pi-curious")
    try:
        assert probe.wait_connack() == 0
        probe.client.subscribe("sensors/#", qos=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not probe.suback and not probe.disconnected.is_set():
            time.sleep(0.05)
        refused = probe.disconnected.is_set() or all(code.is_failure for code in probe.suback)
        assert refused, f"subscribe was granted: {probe.suback}"
    finally:
        probe.close()


def test_guest_cannot_use_amqp(rabbit: RabbitBroker) -> None:
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        rabbit.connection(NodeCredentials("guest", "guest"))


def test_pipeline_user_cannot_change_topology(rabbit: RabbitBroker) -> None:
    with contextlib.closing(rabbit.connection()) as conn:
        channel = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.queue_declare("sneaky", durable=True)
        assert refused.value.reply_code == 403


def test_nacked_reading_is_dead_lettered_with_original_key(rabbit: RabbitBroker) -> None:
    creds = rabbit.add_node("pi-poison")
    probe = MqttProbe(rabbit, creds, "pi-poison")
    try:
        assert probe.wait_connack() == 0
        assert probe.publish_and_wait("sensors/pi-poison/t1", b"not json")
    finally:
        probe.close()
    rabbit.wait_depth("readings", 1)
    with contextlib.closing(rabbit.connection()) as conn:
        channel = conn.channel()
        method, _, _ = channel.basic_get("readings")
        assert method is not None
        channel.basic_nack(method.delivery_tag, requeue=False)
    rabbit.wait_depth("readings.dead", 1)
    [(method, props, body)] = rabbit.drain("readings.dead")
    assert body == b"not json"
    assert method.routing_key == "readings.dead"
    [death] = props.headers["x-death"]
    assert death["queue"] == "readings"
    assert death["reason"] == "rejected"
    assert death["routing-keys"] == ["sensors.pi-poison.t1"]  # the original key is kept


def test_node_user_cannot_use_amqp_to_read(rabbit: RabbitBroker) -> None:
    creds = rabbit.add_node("pi-reader")
    with contextlib.closing(rabbit.connection(creds)) as conn:
        channel = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_get("readings")
        assert refused.value.reply_code == 403


def test_node_user_declares_nothing(rabbit: RabbitBroker) -> None:
    creds = rabbit.add_node("pi-declarer")
    with contextlib.closing(rabbit.connection(creds)) as conn:
        channel = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.queue_declare("mine", durable=True)
        assert refused.value.reply_code == 403


def test_management_api_has_no_default_account(rabbit: RabbitBroker) -> None:
    import base64  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    def status(user: str, password: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{rabbit.management_port}/api/whoami",
            headers={
                "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    assert status("guest", "guest") == 401
    assert status(rabbit.pipeline.username, "wrong") == 401
    node = rabbit.add_node("pi-ui")
    assert status(node.username, node.password) == 401  # no management tag
    assert status(rabbit.admin.username, rabbit.admin.password) == 200
