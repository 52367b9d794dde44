"""Each MQTT connection's statuses carry its own session id (issue 13, item 5).

The pipeline applies an ``offline`` only to the connection it belongs to, so the Last Will of
an old connection, arriving after the node has reconnected, cannot mark the node offline. For
that the Last Will, the retained ``online``, the heartbeats and the clean-shutdown ``offline``
of one connection carry the same session id, and the next connection another one.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from jsonschema import Draft202012Validator

from edge_agent.agent import Agent, Backoff
from edge_agent.clock import KernelClock
from edge_agent.config import AgentConfig, MqttConfig, OutboxConfig, SensorConfig
from edge_agent.outbox import Outbox
from tempmon_contract.wire import status_payload
from tests.harness.procs import REPO
from tests.unit.edge.fake_mqtt import FakeBroker, FakeClient

NODE = "pi-session"
SESSION = re.compile(r"[0-9a-f]{16}")
STATUS_SCHEMA = Draft202012Validator(
    json.loads((REPO / "gateway" / "schema" / "status.v1.schema.json").read_text())
)


def _agent(box: Outbox, *, port: int = 1883, factory: Callable[[], Any] | None = None) -> Agent:
    config = AgentConfig(
        node_id=NODE,
        mqtt=MqttConfig(host="127.0.0.1", port=port),
        outbox=OutboxConfig(path=box.path),
        sensors=(SensorConfig(id="sim-1", kind="simulated"),),
        heartbeat_s=0.05,
    )
    return Agent(
        config,
        sensors=[],
        clock=KernelClock(assume_synced=True),
        outbox=box,
        client_factory=factory,
        backoff=Backoff(initial=0.01, cap=0.05),
    )


def _run_until(agent: Agent, what: str, done: Callable[[], bool], within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s} s"
        agent.step(0.005)


def _statuses_of(broker: FakeBroker, client: FakeClient) -> list[dict[str, Any]]:
    return [status for sender, status in broker.statuses if sender is client]


def test_one_connection_one_session_a_new_connection_a_new_one(tmp_path: Path) -> None:
    broker = FakeBroker()
    with Outbox(tmp_path / "o.sqlite") as box:
        agent = _agent(box, factory=broker.client)
        first_heartbeat = lambda: len(broker.statuses) >= 3  # noqa: E731 - online + heartbeats
        _run_until(agent, "online and two heartbeats", first_heartbeat)
        # The connection drops (the broker restarts, a NAT forgets it): a new one follows.
        first = broker.clients[0]
        first.disconnect()
        _run_until(
            agent,
            "a second connection's heartbeat",
            lambda: len(broker.clients) == 2 and len(_statuses_of(broker, broker.clients[1])) >= 2,
        )
        second = broker.clients[1]
        agent.shutdown()

    sessions = []
    for client in (first, second):
        assert client.will is not None, "every connection registers its Last Will"
        topic, will, qos, retain = client.will
        assert (topic, qos, retain) == (f"status/{NODE}", 1, True)
        assert set(will) == {"version", "node", "state", "session"}
        assert will["state"] == "offline"
        assert SESSION.fullmatch(will["session"])
        statuses = _statuses_of(broker, client)
        assert statuses[0]["state"] == "online"
        assert any("outbox_depth" in s for s in statuses[1:]), "a heartbeat"
        assert {s["session"] for s in statuses} == {will["session"]}
        for payload in [will, *statuses]:
            STATUS_SCHEMA.validate(payload)
        sessions.append(will["session"])
    assert sessions[0] != sessions[1]
    # The clean shutdown's offline belongs to the connection it ends.
    assert _statuses_of(broker, second)[-1]["state"] == "offline"
    assert _statuses_of(broker, first)[-1]["state"] == "online"


def test_the_real_paho_clients_last_will_carries_the_session(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the connect fails at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Outbox(tmp_path / "o.sqlite") as box:
        agent = _agent(box, port=port)
        agent.mqtt_session._try_connect()
        client = agent.mqtt_session.client
        assert isinstance(client, mqtt.Client)
        assert client._will_topic == f"status/{NODE}".encode()
        assert client._will_qos == 1
        assert client._will_retain is True
        will = json.loads(client._will_payload)
        assert will == {"version": 1, "node": NODE, "state": "offline", "session": agent.session}
        STATUS_SCHEMA.validate(will)
        # A retry of the same client keeps its session; only a new client gets a new one.
        session = agent.session
        agent.mqtt_session._try_connect()
        assert agent.session == session
        agent.mqtt_session._lost("test", quiet=True)
        agent.mqtt_session._try_connect()
        assert agent.mqtt_session.client is not client
        assert agent.session != session
        agent.shutdown()


def test_status_payload_takes_a_session_of_16_lowercase_hex_digits() -> None:
    body = json.loads(status_payload(node=NODE, state="online", session="0123456789abcdef"))
    assert body["session"] == "0123456789abcdef"
    STATUS_SCHEMA.validate(body)
    assert "session" not in json.loads(status_payload(node=NODE, state="online"))
    for bad in ("", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "g" * 16):
        with pytest.raises(ValueError, match="16 lowercase hex digits"):
            status_payload(node=NODE, state="offline", session=bad)
