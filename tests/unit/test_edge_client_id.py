"""The agent's MQTT client id: ``<node>-<128 random bits>``, made once and kept in the outbox.

RabbitMQ closes a connection when another one arrives with the same client id, whatever its
user, so the id must be impossible for another node to guess (tests/system/test_client_id.py
tries the takeover against both brokers). It must also stay the same across restarts of the
same node, so it lives in the outbox with the node's other durable state; the MQTT session is
clean, so a new outbox with a new id loses nothing.
"""

from __future__ import annotations

import re
import socket
import sqlite3
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_agent.agent import Agent, mqtt_client_id
from edge_agent.clock import KernelClock
from edge_agent.config import AgentConfig, MqttConfig, SensorConfig
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.sensors import Simulated

NODE = "pi-kitchen"
TOKEN = re.compile(r"[0-9a-f]{32}")


def _agent(outbox: Outbox, node: str = NODE, port: int = 1883) -> Agent:
    config = AgentConfig(
        node_id=node,
        mqtt=MqttConfig(host="127.0.0.1", port=port),
        sensors=(SensorConfig(id="sim-1", kind="simulated"),),
        heartbeat_s=60,
    )
    return Agent(
        config,
        sensors=[Simulated("sim-1", seed=1)],
        clock=KernelClock(assume_synced=True),
        outbox=outbox,
    )


def test_the_token_is_128_random_bits_made_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        token = box.client_token()
        assert TOKEN.fullmatch(token)
        assert box.client_token() == token


def test_the_token_survives_a_restart(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        token = box.client_token()
    with Outbox(tmp_path / "o.sqlite") as box:
        assert box.client_token() == token


def test_every_new_outbox_gets_its_own_token(tmp_path: Path) -> None:
    """A new SD card (a new outbox) is a new id; two nodes never share one by chance."""
    tokens = set()
    for n in range(20):
        with Outbox(tmp_path / f"o{n}.sqlite") as box:
            tokens.add(box.client_token())
    assert len(tokens) == 20


def test_a_damaged_token_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as box:
        box.client_token()
    for damaged in ("", "pi-kitchen", "ABCDEF" * 6, "0" * 31, 42):
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'mqtt_client_token'", (damaged,))
        conn.close()
        with Outbox(path) as box:
            token = box.client_token()
            assert TOKEN.fullmatch(token), damaged
            assert box.client_token() == token


def test_the_client_id_is_the_node_and_the_outboxs_token(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        agent = _agent(box)
        assert agent.client_id == f"{NODE}-{box.client_token()}"
        assert agent.client_id != NODE
        assert _agent(box).client_id == agent.client_id  # the same across restarts


def test_the_same_node_on_a_new_outbox_gets_a_new_client_id(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.sqlite") as first, Outbox(tmp_path / "b.sqlite") as second:
        assert _agent(first).client_id != _agent(second).client_id


def test_the_paho_client_uses_it_with_a_clean_session_and_the_nodes_will(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the connect fails at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Outbox(tmp_path / "o.sqlite") as box:
        agent = _agent(box, port=port)
        # the agent's own client, with its Last Will (set before CONNECT)
        agent.mqtt_session._try_connect()
        client = agent.mqtt_session.client
        assert isinstance(client, mqtt.Client)
        assert client._client_id == agent.client_id.encode()
        # Clean: the outbox keeps what is unacknowledged, the broker keeps nothing.
        assert client._clean_session is True
        # The Last Will still speaks for the node, on status/<node> (tests/unit/
        # test_edge_session.py checks its session id).
        assert client._will_topic == f"status/{NODE}".encode()
        agent.shutdown()


class _FullDisk(Outbox):
    def client_token(self) -> str:
        raise OutboxError("the disk holding the outbox is full")


def test_without_a_stored_token_the_id_is_still_unguessable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _FullDisk(tmp_path / "o.sqlite") as box:
        first, second = _agent(box), _agent(box)
    for agent in (first, second):
        node, _, token = agent.client_id.rpartition("-")
        assert node == NODE
        assert TOKEN.fullmatch(token)
    assert first.client_id != second.client_id
    assert "cannot keep the MQTT client id in the outbox" in caplog.text


@pytest.mark.parametrize(
    ("node", "token"),
    [
        ("pi.kitchen", "0" * 32),  # a dot would not be a valid node id
        ("", "0" * 32),
        ("x" * 65, "0" * 32),
        (NODE, ""),
        (NODE, "0" * 31),
        (NODE, "A" * 32),
        (NODE, "g" * 32),
    ],
)
def test_mqtt_client_id_refuses_what_is_not_an_id(node: str, token: str) -> None:
    with pytest.raises(ValueError, match=r"node id|token") as caught:
        mqtt_client_id(node, token)
    if token:
        assert token not in str(caught.value)


def test_the_longest_client_id_is_97_characters() -> None:
    assert len(mqtt_client_id("x" * 64, "f" * 32)) == 97
