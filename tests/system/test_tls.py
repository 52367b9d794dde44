"""MQTT over TLS: the agent verifies the broker's certificate; a wrong one is refused; with TLS
on, plain MQTT is closed and the CA's key is nowhere the broker can read.

The brokers here load gateway/rabbitmq/tls.conf (as ``docker compose -f docker-compose.yml -f
gateway/compose.tls.yml`` does) with certificates made by gateway/tls/make-certs.sh: the native
one, and RabbitMQ 4 in its image with exactly compose.tls.yml's mounts and ports.
"""

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

from tests.conftest import BROKERS
from tests.harness import RabbitBroker
from tests.harness.agent_proc import AgentProcess, write_config
from tests.harness.procs import REPO, port_open, wait_for
from tests.harness.rabbit_container import RabbitContainer

pytestmark = pytest.mark.system


@pytest.fixture(scope="module", params=BROKERS)
def tls_broker(request: pytest.FixtureRequest) -> Iterator[RabbitBroker]:
    """A broker with TLS on: the native one, or RabbitMQ 4 as compose.tls.yml runs it."""
    broker: RabbitBroker
    if request.param == "native":
        broker = RabbitBroker(tls=True)
    else:
        engine = request.getfixturevalue("docker_engine")
        images = request.getfixturevalue("standins")
        broker = RabbitContainer(engine, image=images.tags["rabbitmq"], tls=True)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture
def rabbit(tls_broker: RabbitBroker) -> RabbitBroker:
    tls_broker.start()
    tls_broker.purge("readings", "node-status", "readings.dead", "node-status.dead")
    return tls_broker


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
    return tmp_path / "other" / "broker" / "ca.pem"


def test_agent_publishes_over_tls_with_the_gateway_ca(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = AgentProcess(_tls_config(tmp_path, rabbit, "pi-tls", rabbit.ca_file))
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


def test_with_tls_on_plain_mqtt_is_closed(rabbit: RabbitBroker) -> None:
    """tls.conf closes the plain listener: a node cannot send its password in clear."""
    creds = rabbit.add_node("pi-plain")
    if isinstance(rabbit, RabbitContainer):
        # compose.tls.yml does not publish 1883, and nothing listens on it in the container
        # (1883 is 0x075B in /proc/net/tcp; 8883, 0x22B3, listens).
        assert rabbit.engine.docker("port", rabbit.name, "1883/tcp", check=False).returncode != 0
        table = rabbit.engine.docker(
            "exec", rabbit.name, "sh", "-c", "cat /proc/net/tcp /proc/net/tcp6"
        ).stdout
        listening = {
            fields[1].rsplit(":", 1)[1]
            for fields in (line.split() for line in table.splitlines())
            if len(fields) > 3 and fields[3] == "0A"
        }
        assert "075B" not in listening, "plain MQTT listens inside the broker's container"
        assert "22B3" in listening
    else:
        # The override file still names a plain listener; tls.conf's `none` wins.
        assert not port_open(rabbit.mqtt_port)
    # And the TLS door works for the same node.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-plain")
    client.username_pw_set(creds.username, creds.password)
    client.tls_set(ca_certs=str(rabbit.ca_file), cert_reqs=ssl.CERT_REQUIRED)
    connected: list[object] = []
    client.on_connect = lambda *args: connected.append(args[3])
    client.connect("localhost", rabbit.mqtt_tls_port)
    client.loop_start()
    try:
        wait_for("CONNACK over TLS", lambda: bool(connected), 10)
    finally:
        client.loop_stop()
        client.disconnect()
    assert not getattr(connected[0], "is_failure", True)


def test_the_ca_key_is_not_deployed(rabbit: RabbitBroker) -> None:
    """make-certs.sh keeps the CA's private key out of the folder the broker mounts."""
    assert sorted(p.name for p in (rabbit.tls_dir / "broker").iterdir()) == [
        "ca.pem",
        "server.key",
        "server.pem",
    ]
    assert (rabbit.tls_dir / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    if isinstance(rabbit, RabbitContainer):
        mounted = rabbit.engine.docker("exec", rabbit.name, "ls", "-A", "/etc/rabbitmq/tls")
        assert sorted(mounted.stdout.split()) == ["ca.pem", "server.key", "server.pem"]
        found = rabbit.engine.docker(
            "exec",
            "--user",
            "root",
            rabbit.name,
            "sh",
            "-c",
            "grep -rl 'PRIVATE KEY' /etc /var/lib/rabbitmq 2>/dev/null || true",
        ).stdout.split()
        assert found == ["/etc/rabbitmq/tls/server.key"], found


def test_the_certificates_are_scoped(tmp_path: Path) -> None:
    """The CA signs server certificates only; the server certificate names only what was asked."""
    subprocess.run(
        ["sh", str(REPO / "gateway/tls/make-certs.sh"), str(tmp_path / "c"), "gw.example.org"],
        check=True,
        capture_output=True,
    )

    def text(name: str) -> str:
        return subprocess.run(
            ["openssl", "x509", "-in", str(tmp_path / "c" / name), "-noout", "-text"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    ca = text("ca/ca.pem")
    assert "CA:TRUE, pathlen:0" in ca
    assert "Certificate Sign, CRL Sign" in ca
    server = text("broker/server.pem")
    assert "DNS:gw.example.org" in server
    assert "localhost" not in server
    assert "127.0.0.1" not in server
    assert "CA:FALSE" in server
    assert "TLS Web Server Authentication" in server
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "c/broker/ca.pem"),
            str(tmp_path / "c/broker/server.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
