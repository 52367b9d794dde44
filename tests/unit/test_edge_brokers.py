"""Several brokers: `mqtt.hosts`, a random start, failover, and the pacing between attempts.

The agent's session runs against fake brokers reached by address (:class:`FakeNetwork`): a
client connects to whichever broker its ``connect(host, port)`` names, as paho does, so a
broker can be down (the connect is refused), refuse the CONNACK, hang before it, die in the
middle of a session (forgetting what it had not acknowledged yet: the worst case), or swallow
publishes without a PUBACK. Two tests use the real paho client against small local servers:
a refused CONNACK, and TLS checking each broker's certificate against its own host name.
The real RabbitMQ brokers are in tests/system/test_edge_failover.py.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

import edge_agent.session as session_module
from edge_agent.agent import Agent, Backoff, BrokerRotation
from edge_agent.cli import main
from edge_agent.clock import KernelClock
from edge_agent.config import (
    MAX_BROKERS,
    AgentConfig,
    Broker,
    MqttConfig,
    OutboxConfig,
    SensorConfig,
    load_config,
)
from edge_agent.errors import ConfigError
from edge_agent.outbox import Outbox
from edge_agent.sensors import Sensor, Simulated
from edge_agent.session import Session
from tests.harness.procs import REPO
from tests.unit.edge.agents import fill, sequence_counter
from tests.unit.edge.fake_mqtt import FakeBroker, FakeClient, FakeInfo

NODE = "pi-cluster"
GW1, GW2, GW3 = Broker("gw-1", 1883), Broker("gw-2", 1884), Broker("10.0.0.3", 1883)
ADDRESSES = (GW1, GW2, GW3)


# --- configuration ----------------------------------------------------------------------------

BASE = """
[node]
id = "pi-kitchen"
[mqtt]
{mqtt}
[outbox]
path = "{outbox}"
[[sensors]]
id = "cpu"
kind = "cpu"
"""


def _load(tmp_path: Path, mqtt_lines: str, env: dict[str, str] | None = None) -> MqttConfig:
    path = tmp_path / "config.toml"
    path.write_text(BASE.format(mqtt=mqtt_lines, outbox=tmp_path / "outbox.sqlite"))
    return load_config(path, env or {}).mqtt


def _error(tmp_path: Path, mqtt_lines: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, mqtt_lines, env)
    return str(caught.value)


def test_hosts_with_and_without_ports(tmp_path: Path) -> None:
    mqtt_config = _load(
        tmp_path,
        'hosts = ["gw-1", "gw-2:1884", "10.0.0.3", "[::1]:1885", "[2001:db8::7]", '
        '"gw-4.site.lan."]\nport = 1999',
    )
    assert mqtt_config.brokers == (
        Broker("gw-1", 1999),  # a missing port takes mqtt.port
        Broker("gw-2", 1884),
        Broker("10.0.0.3", 1999),
        Broker("::1", 1885),
        Broker("2001:db8::7", 1999),
        Broker("gw-4.site.lan.", 1999),
    )
    # host and port stay meaningful for code that knows one broker: the first one.
    assert (mqtt_config.host, mqtt_config.port) == ("gw-1", 1999)
    assert [str(b) for b in mqtt_config.brokers[2:5]] == [
        "10.0.0.3:1999",
        "[::1]:1885",
        "[2001:db8::7]:1999",
    ]


def test_a_missing_port_takes_the_tls_default(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read by the parser")
    mqtt_config = _load(tmp_path, f'hosts = ["gw-1", "gw-2:9883"]\nca_file = "{ca}"')
    assert mqtt_config.brokers == (Broker("gw-1", 8883), Broker("gw-2", 9883))


def test_the_single_host_is_a_list_of_one(tmp_path: Path) -> None:
    assert _load(tmp_path, 'host = "gw"\nport = 1884').brokers == (Broker("gw", 1884),)
    assert _load(tmp_path, "").brokers == (Broker("localhost", 1883),)
    assert _load(tmp_path, 'host = "::1"').brokers == (Broker("::1", 1883),)
    env = {"EDGE_MQTT_HOST": "10.0.0.9"}
    assert _load(tmp_path, "port = 1884", env).brokers == (Broker("10.0.0.9", 1884),)
    # Built in code, as the tests and older callers do.
    assert MqttConfig(host="gw", port=2).brokers == (Broker("gw", 2),)
    built = MqttConfig(brokers=(GW2, GW1))
    assert (built.host, built.port) == ("gw-2", 1884)


def test_environment_list(tmp_path: Path) -> None:
    env = {"EDGE_MQTT_HOSTS": " gw-1 , gw-2:1884,[::1]:1885 "}
    mqtt_config = _load(tmp_path, 'hosts = ["other"]', env)  # the environment wins
    assert mqtt_config.brokers == (GW1, GW2, Broker("::1", 1885))
    # Blank, as an empty line in an environment file leaves it: not set.
    assert _load(tmp_path, 'host = "gw"', {"EDGE_MQTT_HOSTS": "  "}).brokers == (
        Broker("gw", 1883),
    )


def test_host_and_hosts_together_are_an_error_naming_both(tmp_path: Path) -> None:
    message = _error(tmp_path, 'host = "gw"\nhosts = ["gw-1"]')
    assert "mqtt.host = 'gw'" in message
    assert "mqtt.hosts = ['gw-1']" in message
    message = _error(tmp_path, 'hosts = ["gw-1"]', {"EDGE_MQTT_HOST": "gw-9"})
    assert "mqtt.host (EDGE_MQTT_HOST) = 'gw-9'" in message
    assert "mqtt.hosts = ['gw-1']" in message


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ('["gw-1", ""]', "mqtt.hosts[1] = '' is empty"),
        ('["gw-1", "  "]', "mqtt.hosts[1] = '  ' is empty"),
        ('["gw-1:0"]', "mqtt.hosts[0] = 'gw-1:0': the port '0' must be 1..65535"),
        ('["gw-1:65536"]', "mqtt.hosts[0] = 'gw-1:65536': the port '65536'"),
        ('["gw-1:http"]', "mqtt.hosts[0] = 'gw-1:http': the port 'http'"),
        ('["gw-1:"]', "mqtt.hosts[0] = 'gw-1:': the port ''"),
        ('["gw-1:-1"]', "the port '-1'"),
        ('["gw-1", "GW-1.:1883"]', "mqtt.hosts[1] = 'GW-1.:1883' names the same broker as 'gw-1'"),
        ('["[::1]:1883", "[0::1]"]', "mqtt.hosts[1] = '[0::1]' names the same broker"),
        ('["::1"]', "mqtt.hosts[0] = '::1': an IPv6 address goes in brackets"),
        ('["[gw-1]:1883"]', "mqtt.hosts[0] = '[gw-1]:1883' is not an IPv6 address in brackets"),
        ('["[::1]x"]', "mqtt.hosts[0] = '[::1]x' is not an IPv6 address in brackets"),
        ('["mqtt://gw-1:1883"]', "mqtt.hosts[0] = 'mqtt://gw-1:1883' is not a host name"),
        ('["gw 1"]', "mqtt.hosts[0] = 'gw 1' is not a host name"),
        ('["gw_1..lan"]', 'mqtt.hosts[0] = \'gw_1..lan\' is not "host" or "host:port"'),
        ('["-gw"]', "mqtt.hosts[0] = '-gw' is not"),
        (f'["{"a" * 64}.lan"]', 'is not "host" or "host:port"'),
        ('["gw-1", 1883]', "mqtt.hosts[1] = 1883 must be a string"),
        ("[]", "mqtt.hosts = [] is empty"),
        ("1883", "mqtt.hosts = 1883 must be a list"),
        ('{ a = "b" }', "mqtt.hosts = {'a': 'b'} must be a list"),
    ],
)
def test_bad_hosts_are_named_with_their_value(tmp_path: Path, hosts: str, expected: str) -> None:
    assert expected in _error(tmp_path, f"hosts = {hosts}")


def test_bad_entries_from_the_environment_name_the_variable(tmp_path: Path) -> None:
    message = _error(tmp_path, "", {"EDGE_MQTT_HOSTS": "gw-1,,gw-2"})
    assert message.startswith("mqtt.hosts[1] (EDGE_MQTT_HOSTS) = '' is empty")
    message = _error(tmp_path, "", {"EDGE_MQTT_HOSTS": "gw-1,gw-2:99999"})
    assert "mqtt.hosts[1] (EDGE_MQTT_HOSTS) = 'gw-2:99999'" in message


def test_at_most_sixteen_brokers(tmp_path: Path) -> None:
    names = [f"gw-{n}" for n in range(MAX_BROKERS + 1)]
    assert len(_load(tmp_path, f"hosts = {json.dumps(names[:-1])}").brokers) == MAX_BROKERS
    message = _error(tmp_path, f"hosts = {json.dumps(names)}")
    assert f"mqtt.hosts has {MAX_BROKERS + 1} entries: at most {MAX_BROKERS}" in message


def test_the_single_host_is_checked_too(tmp_path: Path) -> None:
    message = _error(tmp_path, 'host = "gw:1884"')
    assert "mqtt.host = 'gw:1884' is not a host name or IP address" in message
    assert "mqtt.hosts" in message  # the hint: how to give a port per broker


def test_a_bad_list_is_a_configuration_error_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE.format(mqtt='hosts = ["gw-1", "gw-1"]', outbox=tmp_path / "o.sqlite"))
    assert main(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "configuration error: mqtt.hosts[1] = 'gw-1' names the same broker" in err


# --- the rotation, by itself ------------------------------------------------------------------


def test_the_order_is_a_shuffle_and_every_broker_comes_once_per_round() -> None:
    brokers = [Broker(f"gw-{n}", 1883) for n in range(5)]
    rotation = BrokerRotation(brokers, Backoff(initial=0.01, cap=1), rng=random.Random(7))
    assert sorted(rotation.order, key=str) == brokers
    seen = [rotation.current]
    for _ in range(14):
        rotation.failed()
        seen.append(rotation.current)
    assert seen == list(rotation.order) * 3
    orders = {BrokerRotation(brokers, Backoff(), rng=random.Random(n)).order for n in range(50)}
    assert len(orders) > 10, "each agent has an order of its own"


def test_random_start_spreads_over_the_brokers() -> None:
    """By default the operating system's randomness: agents configured alike spread out."""
    firsts = collections.Counter(BrokerRotation(ADDRESSES, Backoff()).current for _ in range(3000))
    print(f"first brokers of 3000 rotations: {dict(firsts)}")
    assert set(firsts) == set(ADDRESSES)
    assert all(800 < count < 1200 for count in firsts.values()), firsts


def test_waits_are_short_within_a_round_and_grow_only_per_round() -> None:
    initial, cap = 1.0, 60.0
    rotation = BrokerRotation(ADDRESSES, Backoff(initial=initial, cap=cap), rng=random.Random(1))
    waits = [rotation.failed() for _ in range(3 * 8)]
    for n, wait in enumerate(waits):
        if (n + 1) % 3:  # within a round: the first step's size, never more
            assert initial / 2 <= wait <= initial, (n, waits)
        else:  # a whole round failed: the back-off, doubling per round up to the cap
            step = min(cap, initial * 2 ** ((n + 1) // 3 - 1))
            assert step / 2 <= wait <= step, (n, waits)
    assert rotation.failures == 24
    # A healthy session starts over: the next broker right away, the back-off from the start.
    assert initial / 2 <= rotation.failed(healthy=True) <= initial
    assert rotation.failures == 1
    assert initial / 2 <= rotation.failed() <= initial
    assert initial / 2 <= rotation.failed() <= initial  # the round's end: back-off's first step


def test_one_broker_paces_exactly_like_the_plain_back_off() -> None:
    random.seed(3)
    plain = Backoff(initial=1.0, cap=8.0)
    expected = [plain.next() for _ in range(6)]
    plain.reset()
    expected.append(plain.next())
    random.seed(3)
    rotation = BrokerRotation([GW1], Backoff(initial=1.0, cap=8.0))
    got = [rotation.failed() for _ in range(6)]
    got.append(rotation.failed(healthy=True))
    assert got == expected
    assert rotation.current == GW1


def test_no_brokers_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one broker"):
        BrokerRotation([], Backoff())


# --- fake brokers reached by address ----------------------------------------------------------


class FakeNetwork:
    """Fake brokers by address. ``down``: connects are refused; ``refusing_connack``: the
    CONNACK says "not authorized"; ``hanging``: the CONNACK never comes."""

    def __init__(self, addresses: tuple[Broker, ...]) -> None:
        self.brokers = {address: FakeBroker() for address in addresses}
        self.down: set[Broker] = set()
        self.refusing_connack: set[Broker] = set()
        self.hanging: set[Broker] = set()
        self.attempts: list[tuple[float, Broker]] = []
        self.clients: list[RoutedClient] = []

    def client(self) -> RoutedClient:
        client = RoutedClient(self)
        self.clients.append(client)
        return client

    def kill(self, address: Broker) -> None:
        """kill -9 of a broker: its connections break, and it forgets what it had taken but
        not yet acknowledged (a broker may keep it; the agent must not count on either)."""
        self.down.add(address)
        for client in self.brokers[address].clients:
            if not client.closed:
                assert isinstance(client, RoutedClient)
                client.crash()

    def stored(self) -> list[int]:
        return [seq for broker in self.brokers.values() for seq in broker.stored]


class RoutedClient(FakeClient):
    """A fake paho client whose ``connect`` reaches the broker at that address."""

    def __init__(self, network: FakeNetwork) -> None:
        super().__init__(FakeBroker())  # replaced by the broker it connects to
        self.network = network
        self.address: Broker | None = None
        self._seq_of: dict[int, int] = {}

    def connect(self, host: str, port: int, keepalive: int = 60) -> int:
        address = Broker(host, port)
        self.network.attempts.append((time.monotonic(), address))
        assert not self.closed, "a retired client must not be used again"
        if address in self.network.down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.address = address
        self.broker = self.network.brokers[address]
        self.broker.clients.append(self)
        return super().connect(host, port, keepalive)

    def loop(self, timeout: float = 1.0) -> int:
        if self._connack_due and self.address in self.network.hanging:
            time.sleep(min(timeout, 0.005))
            return mqtt.MQTT_ERR_SUCCESS
        if self._connack_due and self.address in self.network.refusing_connack:
            self._connack_due = False
            self.on_connect(
                self, None, None, ReasonCode(PacketTypes.CONNACK, "Not authorized"), None
            )
            return mqtt.MQTT_ERR_CONN_REFUSED
        return super().loop(timeout)

    def _transmit(self, topic: str, payload: bytes, info: FakeInfo) -> None:
        if topic.startswith("sensors/"):
            self._seq_of[info.mid] = int(json.loads(payload)["seq"])
        super()._transmit(topic, payload, info)

    def crash(self) -> None:
        for info in self._acks:  # taken, PUBACK not sent: the dead broker lost them
            if info.mid in self._seq_of:
                self.broker.stored.remove(self._seq_of[info.mid])
        self._acks.clear()
        self.connected = False
        self.closed = True
        reason = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
        self.on_disconnect(self, None, None, reason, None)


def _agent(
    box: Outbox,
    network: FakeNetwork | None,
    *,
    backoff: Backoff | None = None,
    puback_timeout_s: float = 30.0,
    keepalive_s: int = 60,
    mqtt_config: MqttConfig | None = None,
    sensors: list[Sensor] | None = None,
    interval_s: float = 30.0,
    rng: random.Random | None = None,
) -> Agent:
    """An agent on ``network``'s fake brokers, or, without one, on the real paho client and
    ``mqtt_config``'s brokers."""
    assert network is not None or mqtt_config is not None
    config = AgentConfig(
        node_id=NODE,
        mqtt=mqtt_config
        or MqttConfig(
            brokers=tuple(network.brokers) if network else (),
            max_inflight=10,
            puback_timeout_s=puback_timeout_s,
            keepalive_s=keepalive_s,
        ),
        outbox=OutboxConfig(path=box.path, drain_rate_per_s=10_000),
        sensors=(SensorConfig(id="sim-1", kind="simulated", interval_s=interval_s),),
        heartbeat_s=3600,
        shutdown_flush_s=1.0,
    )
    return Agent(
        config,
        sensors=sensors or [],
        clock=KernelClock(assume_synced=True),
        outbox=box,
        client_factory=network.client if network else None,  # type: ignore[arg-type]  # a duck type
        backoff=backoff or Backoff(initial=0.02, cap=0.2),
        rng=rng,
    )


def _grown(backoff: Backoff, steps: int) -> Backoff:
    """A back-off that earlier outages have grown: its next wait is ``initial * 2**steps``."""
    for _ in range(steps):
        backoff.next()
    return backoff


def _run_until(agent: Agent, what: str, done: Callable[[], bool], within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s} s"
        agent.step(0.002)


def _messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        yield outbox


# --- the agent: start, failover, pacing -------------------------------------------------------


def test_agents_configured_alike_start_on_different_brokers(box: Outbox) -> None:
    network = FakeNetwork(ADDRESSES)
    for _ in range(90):
        agent = _agent(box, network)
        agent.step(0.001)
        assert agent.connected
    firsts = collections.Counter(address for _, address in network.attempts)
    print(f"first brokers of 90 agents: {dict(firsts)}")
    assert sum(firsts.values()) == 90, "one attempt each: every first broker was up"
    assert set(firsts) == set(ADDRESSES)
    assert min(firsts.values()) >= 10, firsts


def test_a_broker_that_is_down_costs_a_short_wait_not_the_back_off(
    box: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    network = FakeNetwork(ADDRESSES)
    # Earlier outages grew the back-off to 0.02 * 2**7 = 2.56 s; a round is not over yet.
    agent = _agent(box, network, backoff=_grown(Backoff(initial=0.02, cap=30), 7))
    dead = agent.broker
    network.down.add(dead)
    began = time.monotonic()
    _run_until(agent, "a connection", lambda: agent.connected, within_s=2)
    took = time.monotonic() - began
    # The grown back-off would have waited 1.28 to 2.56 s; a short wait is 0.01 to 0.02 s.
    assert took < 1.0, f"{took:.2f} s: the back-off was used instead of a short wait"
    assert [address for _, address in network.attempts] == [dead, agent.broker]
    assert agent.broker != dead
    assert len(network.clients) == 1, "the same client (and session) tried the next broker"
    unreachable = next(m for m in _messages(caplog) if "broker unreachable" in m)
    assert f"host={dead.host} port={dead.port} next={agent.broker}" in unreachable
    connected = [m for m in _messages(caplog, logging.INFO) if m.startswith("connected ")]
    at = f"host={agent.broker.host} port={agent.broker.port}"
    assert connected == [f"connected {at} session={agent.session} outbox_depth=0"]


def test_the_back_off_grows_only_when_a_whole_round_failed(box: Outbox) -> None:
    network = FakeNetwork(ADDRESSES)
    network.down.update(ADDRESSES)
    initial = 0.1
    agent = _agent(box, network, backoff=Backoff(initial=initial, cap=10))
    _run_until(agent, "four rounds of attempts", lambda: len(network.attempts) >= 13, 10)
    times = [t for t, _ in network.attempts[:13]]
    brokers = [address for _, address in network.attempts[:13]]
    rounds = [brokers[n : n + 3] for n in range(0, 12, 3)]
    assert all(sorted(r, key=str) == sorted(ADDRESSES, key=str) for r in rounds), rounds
    assert all(r == rounds[0] for r in rounds), "the same order, round after round"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    slack = 0.1  # steps of 2 ms, on a machine that may be busy
    for n, gap in enumerate(gaps):
        if (n + 1) % 3:  # to the next broker of the round: short, whatever the back-off
            assert initial / 2 <= gap <= initial + slack, (n, gaps)
        else:  # after a whole round: the back-off, doubling (0.1, 0.2, 0.4, 0.8 s at most)
            step = initial * 2 ** ((n + 1) // 3 - 1)
            assert step / 2 <= gap <= step + slack, (n, gaps)
    print("gaps between attempts (s): " + " ".join(f"{g:.3f}" for g in gaps))


def test_a_lost_healthy_session_fails_over_at_once(
    box: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(session_module, "HEALTHY_S", 0.1)
    caplog.set_level(logging.INFO, logger="edge_agent")
    network = FakeNetwork(ADDRESSES)
    agent = _agent(box, network, backoff=_grown(Backoff(initial=0.02, cap=30), 8))
    _run_until(agent, "a connection", lambda: agent.connected)
    first = agent.broker
    time.sleep(0.15)  # healthy for longer than HEALTHY_S
    network.kill(first)
    killed = time.monotonic()
    _run_until(agent, "a new session", lambda: agent.connected, within_s=3)
    took = time.monotonic() - killed
    # Not the grown back-off's 2.56 to 5.12 s: a short wait of 0.01 to 0.02 s.
    assert took < 1.0, f"{took:.2f} s after losing a healthy session"
    assert agent.broker != first
    assert agent.brokers.failures == 1
    lost = next(m for m in _messages(caplog) if m.startswith("disconnected"))
    assert lost.startswith(f"disconnected host={first.host} port={first.port} reason=")
    assert f"next={agent.broker} retry_in_s=0.0" in lost


def test_a_session_lost_soon_also_goes_to_another_broker(box: Outbox) -> None:
    network = FakeNetwork(ADDRESSES)
    agent = _agent(box, network, backoff=Backoff(initial=0.02, cap=30))
    _run_until(agent, "a connection", lambda: agent.connected)
    first = agent.broker
    network.kill(first)  # at once: not a healthy session
    _run_until(agent, "a new session", lambda: agent.connected, within_s=1)
    assert agent.broker != first
    assert [address for _, address in network.attempts] == [first, agent.broker]


def test_failover_mid_stream_loses_nothing(box: Outbox) -> None:
    """Rows leave the outbox only on PUBACK: what the dead broker took but did not
    acknowledge (and lost) goes to the next broker, and so does everything after it."""
    network = FakeNetwork(ADDRESSES)
    agent = _agent(box, network)
    seqs = fill(box, 600)
    _run_until(agent, "a connection", lambda: agent.connected)
    first = agent.broker
    _run_until(agent, "some readings stored", lambda: len(network.brokers[first].stored) >= 200)
    in_flight = len(network.brokers[first].clients[-1]._acks)
    network.kill(first)
    assert agent.acknowledged < 600
    _run_until(agent, "the outbox drained", lambda: box.depth() == 0, within_s=10)
    second = agent.broker
    assert second != first
    stored = network.stored()
    assert set(stored) == set(seqs), "every reading is in one broker or the other"
    assert set(network.brokers[second].stored) >= set(seqs) - set(network.brokers[first].stored)
    print(
        f"first={first} stored={len(network.brokers[first].stored)} lost_unacked={in_flight} "
        f"second={second} stored={len(network.brokers[second].stored)} "
        f"duplicates={len(stored) - len(set(stored))}"
    )
    agent.shutdown()


def test_failover_with_the_samplers_running(tmp_path: Path) -> None:
    """The agent's own sampler fills the outbox while brokers die one after the other."""
    network = FakeNetwork(ADDRESSES)
    path = tmp_path / "o.sqlite"
    with Outbox(path) as box:
        seed = sequence_counter(path)  # the first reading gets seed + 1
        agent = _agent(box, network, sensors=[Simulated("sim-1", seed=1)], interval_s=0.002)
        agent.start_sampling()
        killed: list[Broker] = []
        for _ in range(2):
            _run_until(agent, "a session", lambda: agent.connected)
            until = time.monotonic() + 0.2
            _run_until(agent, "a while of publishing", lambda: time.monotonic() > until)  # noqa: B023
            killed.append(agent.broker)
            network.kill(agent.broker)
        _run_until(agent, "a session on the last broker", lambda: agent.connected)
        assert agent.broker not in killed
        agent.shutdown()  # stops the sampler, then flushes what it took
    with Outbox(path) as reopened:
        assert reopened.depth() == 0
    taken = set(range(seed + 1, sequence_counter(path) + 1))
    assert agent.counters.readings == len(taken) > 100
    assert set(network.stored()) == taken
    print(f"taken={len(taken)} stored={len(network.stored())} killed={killed}")


def test_puback_timeout_goes_to_another_broker(
    box: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    network = FakeNetwork(ADDRESSES)
    agent = _agent(box, network, puback_timeout_s=0.2)
    full = agent.broker
    network.brokers[full].refusing = True  # its queue is full: no PUBACK, connection open
    seqs = fill(box, 40)
    _run_until(agent, "a PUBACK timeout", lambda: agent.puback_timeouts == 1)
    _run_until(agent, "the outbox drained", lambda: box.depth() == 0)
    assert agent.broker != full
    assert network.brokers[full].stored == []
    assert sorted(network.brokers[agent.broker].stored) == seqs
    warning = next(m for m in _messages(caplog) if "withholding" in m)
    assert f"withholding acknowledgements host={full.host} port={full.port}:" in warning
    assert f"next={agent.broker} retry_in_s=" in warning
    agent.shutdown()


def test_a_refused_connack_goes_to_another_broker(
    box: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    network = FakeNetwork(ADDRESSES)
    agent = _agent(box, network, backoff=_grown(Backoff(initial=0.02, cap=30), 7))
    refusing = agent.broker
    network.refusing_connack.add(refusing)
    _run_until(agent, "a connection", lambda: agent.connected, within_s=1)
    assert agent.broker != refusing
    first_client, second_client = network.clients
    assert first_client.closed, "the refused connection's client is retired"
    assert second_client.address == agent.broker
    assert first_client.will is not None
    assert first_client.will[1]["session"] != agent.session, "a new client, a new session"
    [error] = _messages(caplog, logging.ERROR)
    assert f"refused the connection host={refusing.host} port={refusing.port}" in error
    assert "reason=Not authorized" in error
    assert f"next={agent.broker} retry_in_s=0.0" in error


def test_no_connack_goes_to_another_broker(
    box: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(session_module, "CONNACK_WAIT_MIN_S", 0.1)
    network = FakeNetwork(ADDRESSES)
    agent = _agent(box, network, keepalive_s=1)
    hanging = agent.broker
    network.hanging.add(hanging)
    _run_until(agent, "a connection", lambda: agent.connected, within_s=3)
    assert agent.broker != hanging
    assert network.clients[0].closed
    warning = next(m for m in _messages(caplog) if "no CONNACK" in m)
    assert f"within 1 s host={hanging.host} port={hanging.port} next={agent.broker}" in warning


# --- the real paho client against small local servers -----------------------------------------


class MiniServer:
    """Accepts TCP (optionally TLS) connections, reads the CONNECT, answers one CONNACK."""

    def __init__(self, connack_code: int, tls: ssl.SSLContext | None = None) -> None:
        self.connack_code = connack_code
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.connects = 0
        self.handshake_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.closing(conn):
                conn.settimeout(2)
                stream: socket.socket = conn
                if self.tls is not None:
                    try:
                        stream = self.tls.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError) as exc:
                        self.handshake_errors.append(str(exc))
                        continue
                with contextlib.suppress(OSError):
                    if stream.recv(1)[:1] == b"\x10":  # CONNECT
                        self.connects += 1
                        stream.sendall(bytes([0x20, 0x02, 0x00, self.connack_code]))
                        time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)


@pytest.fixture
def servers() -> Iterator[list[MiniServer]]:
    started: list[MiniServer] = []
    yield started
    for server in started:
        server.close()


def test_real_paho_refused_connacks_alternate_between_brokers(
    box: Outbox, servers: list[MiniServer], caplog: pytest.LogCaptureFixture
) -> None:
    servers.extend(MiniServer(connack_code=5) for _ in range(2))  # 5: not authorized
    brokers = tuple(Broker("127.0.0.1", s.port) for s in servers)
    mqtt_config = MqttConfig(brokers=brokers, username=NODE, password="wrong")
    agent = _agent(box, None, backoff=Backoff(initial=0.02, cap=0.1), mqtt_config=mqtt_config)
    _run_until(agent, "four refusals", lambda: sum(s.connects for s in servers) >= 4, 10)
    assert all(s.connects >= 2 for s in servers), [s.connects for s in servers]
    refused = [m for m in _messages(caplog, logging.ERROR) if "refused the connection" in m]
    ports = [int(m.split(" port=")[1].split()[0]) for m in refused]
    assert len(ports) >= 3
    assert all(a != b for a, b in itertools.pairwise(ports)), ports
    assert not agent.connected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="make-certs.sh needs openssl")
def test_tls_checks_each_brokers_certificate_against_its_own_host(
    tmp_path: Path, servers: list[MiniServer], caplog: pytest.LogCaptureFixture
) -> None:
    """One CA for every broker; the host name checked is the one each connection goes to.

    The certificate names ``localhost`` only (gateway/tls/make-certs.sh). The same server
    reached as ``localhost`` passes; reached as ``127.0.0.1`` it fails the check, and the
    agent goes on to the other broker.
    """
    subprocess.run(
        ["sh", str(REPO / "gateway/tls/make-certs.sh"), str(tmp_path / "tls"), "localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    certs = tmp_path / "tls" / "broker"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    by_name, by_address = MiniServer(0, context), MiniServer(0, context)
    servers.extend([by_name, by_address])
    mqtt_config = MqttConfig(
        brokers=(Broker("localhost", by_name.port), Broker("127.0.0.1", by_address.port)),
        ca_file=certs / "ca.pem",
    )
    seeds: dict[tuple[Broker, ...], int] = {}  # a seed for each of the two orders
    for seed in range(50):
        seeds.setdefault(
            BrokerRotation(mqtt_config.brokers, Backoff(), rng=random.Random(seed)).order, seed
        )
    assert len(seeds) == 2
    for order, seed in seeds.items():
        with Outbox(tmp_path / f"o{seed}.sqlite") as box:
            agent = _agent(box, None, mqtt_config=mqtt_config, rng=random.Random(seed))
            assert agent.brokers.order == order
            _run_until(agent, "a TLS session", lambda: agent.connected, within_s=10)  # noqa: B023
            assert agent.broker == Broker("localhost", by_name.port)
            client = agent.mqtt_session.client
            assert client is not None
            Session._close_client(client)
    assert by_name.connects == 2
    assert by_address.connects == 0, "a certificate for another name was accepted"
    [failed] = [m for m in _messages(caplog) if "broker unreachable" in m]
    assert f"host=127.0.0.1 port={by_address.port} next=localhost:{by_name.port}" in failed
    assert "IP address mismatch" in failed, failed
    assert len(by_address.handshake_errors) == 1
