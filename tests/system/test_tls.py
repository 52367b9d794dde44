"""MQTT over TLS: the agent verifies the broker's certificate; a wrong one is refused."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import RabbitBroker
from tests.harness.agent_proc import AgentProcess, write_config
from tests.harness.procs import REPO, wait_for

pytestmark = [pytest.mark.system, pytest.mark.both_brokers]


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.alive():
            agent.kill()
        print(f"--- agent log ---\n{agent.log[-3000:]}")


def _tls_config(tmp_path: Path, rabbit: RabbitBroker, node: str, ca_file: Path) -> Path:
    creds = rabbit.add_node(node)
    config = write_config(tmp_path, rabbit, creds, interval_s=0.1, sensors=1)
    text = config.read_text().replace(
        f"port = {rabbit.mqtt_port}", f'port = {rabbit.mqtt_tls_port}\nca_file = "{ca_file}"'
    )
    config.write_text(text.replace('host = "127.0.0.1"', 'host = "localhost"'))
    return config


def _other_ca(tmp_path: Path) -> Path:
    """A throwaway CA that did not sign the broker's certificate."""
    subprocess.run(
        ["sh", str(REPO / "gateway/tls/make-certs.sh"), str(tmp_path / "other"), "localhost"],
        check=True,
        capture_output=True,
    )
    return tmp_path / "other" / "ca.pem"


def test_agent_publishes_over_tls_with_the_gateway_ca(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = AgentProcess(_tls_config(tmp_path, rabbit, "pi-tls", rabbit.tls_dir / "ca.pem"))
    agents.append(agent)
    wait_for("readings over TLS", lambda: rabbit.depth("readings") >= 10, 60, interval=0.5)
    assert agent.terminate() == 0
    [first, *_] = [json.loads(b) for _, _, b in rabbit.drain("readings")]
    assert first["node"] == "pi-tls"


def test_agent_refuses_a_broker_it_cannot_verify(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = AgentProcess(_tls_config(tmp_path, rabbit, "pi-tls-wrong", _other_ca(tmp_path)))
    agents.append(agent)
    wait_for("a refused handshake", lambda: "certificate verify failed" in agent.log, 30)
    time.sleep(2)
    assert rabbit.depth("readings") == 0
    assert agent.alive(), "a refused broker is retried, not fatal"
    assert agent.terminate() == 0


def test_handshake_with_a_foreign_ca_fails_and_plain_mqtt_on_the_tls_port_too(
    rabbit: RabbitBroker, tmp_path: Path
) -> None:
    creds = rabbit.add_node("pi-probe")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-probe")
    client.username_pw_set(creds.username, creds.password)
    client.tls_set(ca_certs=str(_other_ca(tmp_path)), cert_reqs=ssl.CERT_REQUIRED)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect("localhost", rabbit.mqtt_tls_port)
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-probe")
    plain.username_pw_set(creds.username, creds.password)
    connected: list[object] = []
    plain.on_connect = lambda *args: connected.append(args[3])
    plain.connect("127.0.0.1", rabbit.mqtt_tls_port)
    plain.loop_start()
    time.sleep(2)
    plain.loop_stop()
    assert not any(not getattr(rc, "is_failure", True) for rc in connected)
