"""Client-id takeover: another node's credentials must not knock an agent off the broker.

RabbitMQ's MQTT plugin keeps one connection per client id in a vhost: when a second connection
arrives with a client id already in use, the broker closes the first one, whoever its user is
(3.10 and 4.x alike), and the closed connection's Last Will (``offline``, retained) is
published. Every node shares the vhost, so if an agent's client id were its node id, a node
that has been taken over could, with nothing but its own credentials, knock any other node off
the broker as often as it likes, and make the dashboards say the node is offline.

The agent's client id is therefore ``<node>-<128 random bits>``, made once and kept in its
outbox, which no other node can read. The test runs two real agents, lets the attacker learn
everything a node's owner can learn about its own client id (it reads its own connection as
the broker lists it, which shows the scheme), and then connects with the attacker's
credentials under every id it could guess for the victim. The victim's connection must be the
very same connection afterwards, no ``offline`` status may be published for it, and its
readings must keep landing.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.harness import NodeCredentials, RabbitBroker
from tests.harness.agent_proc import AgentProcess, write_config
from tests.harness.procs import wait_for

pytestmark = [pytest.mark.system, pytest.mark.both_brokers]

VICTIM = "pi-victim"
# The longest node id there may be: its client id, 97 characters, must be accepted by both brokers.
ATTACKER = "pi-attacker-" + "x" * 52
# How long each forged connection is held open: several of the victim's heartbeats and reads.
HOLD_S = 2.0


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.alive():
            agent.kill()
        print(f"--- {agent.config.parent.name} log ---\n{agent.log[-3000:]}")


def _connections(rabbit: RabbitBroker) -> list[tuple[str, str, str]]:
    """(client id, user, connection name) of every MQTT connection, as the broker lists them.

    The connection name holds the peer's address and port: a connection that was closed and
    made again has another one.
    """
    out = rabbit.ctl(
        "list_mqtt_connections", "client_id", "user", "conn_name", "--no-table-headers"
    )
    rows = []
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 3:
            rows.append((fields[0], fields[1], fields[2]))
    return rows


def _of_user(rabbit: RabbitBroker, user: str) -> list[tuple[str, str, str]]:
    return [row for row in _connections(rabbit) if row[1] == user]


class _Forger:
    """One MQTT connection with the attacker's credentials and a chosen client id."""

    def __init__(self, rabbit: RabbitBroker, creds: NodeCredentials, client_id: str) -> None:
        self.client_id = client_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(creds.username, creds.password)
        self.connack: ReasonCode | None = None
        self.answered = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", rabbit.mqtt_port, keepalive=30)

    def _on_connect(self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self.connack = rc
        self.answered.set()

    def hold(self, seconds: float) -> None:
        """Drive the connection for ``seconds``.

        The attacker's credentials are valid, so the broker must let it in: a refusal here
        would mean the test no longer tries the attack.
        """
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.client.loop(0.05)
        assert self.answered.is_set(), f"no CONNACK for client id {self.client_id!r}"
        assert self.connack is not None
        assert not self.connack.is_failure, f"{self.client_id!r} refused: {self.connack}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
            self.client.loop(0.2)


def _victim_statuses(rabbit: RabbitBroker) -> list[str]:
    states = []
    for _, _, body in rabbit.drain("node-status"):
        status = json.loads(body)
        if status.get("node") == VICTIM:
            states.append(str(status.get("state")))
    return states


class _Readings:
    """The victim's sequence numbers, taken from the readings queue as they land."""

    def __init__(self, rabbit: RabbitBroker) -> None:
        self.rabbit = rabbit
        self.seqs: list[int] = []

    def take(self) -> int:
        """Drain the queue; the highest sequence number of the victim so far (0: none)."""
        for _, _, body in self.rabbit.drain("readings"):
            reading = json.loads(body)
            if reading["node"] == VICTIM:
                self.seqs.append(int(reading["seq"]))
        return max(self.seqs, default=0)


def test_another_nodes_credentials_cannot_take_over_an_agents_client_id(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    victim = rabbit.add_node(VICTIM)
    attacker = rabbit.add_node(ATTACKER)
    for creds in (victim, attacker):
        config = write_config(
            tmp_path / creds.username, rabbit, creds, interval_s=0.1, sensors=1, heartbeat_s=1
        )
        agents.append(AgentProcess(config))
    victim_agent, attacker_agent = agents
    wait_for(
        "both agents connected",
        lambda: len(_of_user(rabbit, VICTIM)) == 1 and len(_of_user(rabbit, ATTACKER)) == 1,
        60,
        interval=0.5,
    )
    readings = _Readings(rabbit)
    wait_for("the victim's readings", lambda: readings.take() > 0, 30, interval=0.5)

    # What the attacker's owner knows: its own client id (the broker shows it), so the scheme.
    own_id = _of_user(rabbit, ATTACKER)[0][0]
    before = _of_user(rabbit, VICTIM)
    assert own_id.startswith(ATTACKER)
    assert before[0][0].startswith(VICTIM)
    # The attacker owns its Pi: it stops its own agent and uses the credentials itself (so no
    # per-user connection limit of the broker's stands in its way).
    assert attacker_agent.terminate() == 0
    wait_for("the attacker's agent gone", lambda: not _of_user(rabbit, ATTACKER), 30)
    guesses = list(
        dict.fromkeys(
            [
                VICTIM,  # the node id, the old client id
                VICTIM + own_id.removeprefix(ATTACKER),  # its own secret under the victim's id
                f"{VICTIM}-{'0' * 32}",  # the scheme's shape with a made-up secret
                f"{VICTIM}-",
                VICTIM.upper(),
            ]
        )
    )
    print(f"the attacker's own client id has {len(own_id)} characters; guesses: {guesses}")
    _victim_statuses(rabbit)  # only what is published from now on counts
    last_before = readings.take()

    answers = {}
    for guess in guesses:
        forger = _Forger(rabbit, attacker, guess)
        try:
            forger.hold(HOLD_S)
            answers[guess] = str(forger.connack)
        finally:
            forger.close()
    print(f"CONNACKs: {answers}")
    time.sleep(3)  # a knocked-off agent would have published its Last Will and reconnected

    after = _of_user(rabbit, VICTIM)
    statuses = _victim_statuses(rabbit)
    # Every broken promise at once, so a failure shows the whole effect of the attack.
    problems = []
    if after != before:
        problems.append(f"the victim's connection was replaced: {before} -> {after}")
    if "offline" in statuses:
        problems.append(f"the victim's Last Will was published: {statuses}")
    if "online" not in statuses:
        problems.append(f"the victim sent no heartbeat during the attack: {statuses}")
    if "disconnected" in victim_agent.log or victim_agent.log.count("connected host=") != 1:
        problems.append(f"the victim had to reconnect:\n{victim_agent.log[-1500:]}")
    assert not problems, "\n".join(problems)
    wait_for(
        "the victim's readings keep landing",
        lambda: readings.take() > last_before,
        15,
        interval=0.5,
    )
    assert victim_agent.terminate() == 0
