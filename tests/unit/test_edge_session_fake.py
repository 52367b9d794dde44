"""The MQTT session by itself, on the agent's own fake paho client (:mod:`edge_agent.testing`).

Each test builds a :class:`Session` over a real outbox file and drives it in the agent's order
(poll, then PUBACK check and drain while connected, then the acknowledgements); the fake lets
the test decide what a broker does: accept or refuse the CONNACK, acknowledge or withhold each
PUBACK, drop the connection. The real paho client against real brokers is in tests/system/.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import edge_agent.session as session_module
from edge_agent.agent import Agent
from edge_agent.clock import KernelClock
from edge_agent.config import AgentConfig, Broker, MqttConfig, OutboxConfig, SensorConfig
from edge_agent.outbox import Outbox
from edge_agent.reconnect import Backoff
from edge_agent.session import Session
from edge_agent.testing import FakeBrokers, FakeMqttClient
from tests.unit.edge.agents import fill

NODE = "pi-fake"
GW_A, GW_B, GW_C = Broker("gw-a", 1883), Broker("gw-b", 1884), Broker("gw-c", 1883)


def _address(broker: Broker) -> tuple[str, int]:
    return (broker.host, broker.port)


def _session(
    box: Outbox,
    brokers: FakeBrokers,
    *,
    addresses: tuple[Broker, ...] = (GW_A, GW_B),
    max_inflight: int = 100,
    puback_timeout_s: float = 30.0,
    drain_rate_per_s: float = 10_000,
    backoff: Backoff | None = None,
) -> Session:
    return Session(
        MqttConfig(brokers=addresses, max_inflight=max_inflight, puback_timeout_s=puback_timeout_s),
        node=NODE,
        outbox=box,
        clock=KernelClock(assume_synced=True),
        drain_rate_per_s=drain_rate_per_s,
        client_factory=brokers.client,
        backoff=backoff or Backoff(initial=0.02, cap=0.2),
        rng=random.Random(5),
    )


def _step(session: Session) -> None:
    """One turn, in the order :meth:`edge_agent.agent.Agent.step` takes it."""
    session.poll(0.002)
    if session.connected:
        session.check_pubacks()
    if session.connected:
        session.drain()
    session.flush_acks()


def _until(session: Session, what: str, done: Callable[[], bool], within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s} s"
        _step(session)


def _seqs(client: FakeMqttClient) -> list[int]:
    """The readings a client published, by seq, in the order sent."""
    return [int(p.json()["seq"]) for p in client.published if p.topic.startswith("sensors/")]


def _pending(box: Outbox) -> list[int]:
    return [row.seq for row in box.pending(0, 10_000)]


def _messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        yield outbox


def test_a_puback_deletes_exactly_the_acknowledged_reading(box: Outbox) -> None:
    brokers = FakeBrokers(auto_puback=False)
    seqs = fill(box, 5)
    session = _session(box, brokers)
    _until(session, "five readings in flight", lambda: session.in_flight == 5)
    client = brokers.last
    assert _seqs(client) == seqs, "oldest first, each once"
    assert [p.qos for p in client.published] == [1] * 5
    assert {p.topic for p in client.published} == {f"sensors/{NODE}/sim-1"}
    assert box.depth() == 5, "nothing leaves the outbox before its PUBACK"

    acked = seqs[2]
    client.puback(client.mid_of(acked))
    _until(session, "the acknowledgement", lambda: session.acknowledged == 1)
    assert _pending(box) == [s for s in seqs if s != acked]
    assert session.in_flight == 4
    assert sorted(client.seq_of(mid) for mid in client.unacked) == sorted(set(seqs) - {acked})
    # More turns change nothing: the other four wait for their own PUBACKs.
    for _ in range(5):
        _step(session)
    assert box.depth() == 4
    assert session.acknowledged == 1
    assert session.published == 5, "nothing was sent twice within the session"


def test_withheld_pubacks_end_the_session_and_move_to_the_next_broker(
    box: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    brokers = FakeBrokers(auto_puback=False)  # a full queue: publishes taken, never acknowledged
    seqs = fill(box, 4)
    session = _session(box, brokers, puback_timeout_s=0.2)
    full = session.broker
    _until(session, "four readings in flight", lambda: session.in_flight == 4)
    sent = time.monotonic()
    _until(session, "a PUBACK timeout", lambda: session.puback_timeouts == 1)
    assert time.monotonic() - sent >= 0.2 - 0.05, "not before mqtt.puback_timeout_s"
    first = brokers.last
    assert first.closed, "the stalled session's client is retired"
    assert not session.connected
    assert session.broker != full
    assert session.puback_timeout_publishes == 4
    assert box.puback_timeouts() == (1, 4), "the episode is counted in the outbox at once"
    assert _pending(box) == seqs, "the readings stay in the outbox"
    [warning] = [m for m in _messages(caplog) if "withholding" in m]
    assert f"withholding acknowledgements host={full.host} port={full.port}:" in warning
    assert "unacknowledged=4 readings=4" in warning
    assert f"oldest_seq={seqs[0]}" in warning
    assert f"next={session.broker} retry_in_s=" in warning

    brokers.auto_puback = True  # the next broker's queue has room
    _until(session, "the outbox drained", lambda: box.depth() == 0)
    second = brokers.last
    assert second is not first
    assert second.address == _address(session.broker)
    assert sorted(_seqs(second)) == seqs, "everything unacknowledged went to the next broker"
    assert [address for _, address in brokers.attempts] == [_address(full), second.address]


@pytest.mark.parametrize(
    ("code", "reason"), [(4, "Bad user name or password"), (5, "Not authorized")]
)
def test_a_refused_connack_moves_to_the_next_broker_after_a_short_jittered_wait(
    box: Outbox, caplog: pytest.LogCaptureFixture, code: int, reason: str
) -> None:
    initial = 0.2
    backoff = Backoff(initial=initial, cap=60)
    for _ in range(6):  # earlier outages grew it: its next wait would be 6.4 to 12.8 s
        backoff.next()
    brokers = FakeBrokers()
    session = _session(box, brokers, addresses=(GW_A, GW_B, GW_C), backoff=backoff)
    refusing = session.broker
    brokers.connack[_address(refusing)] = code
    _until(session, "a connection", lambda: session.connected, within_s=3)
    assert session.broker != refusing
    assert session.brokers.failures == 1
    (t_refused, at_refused), (t_next, at_next) = brokers.attempts
    assert (at_refused, at_next) == (_address(refusing), _address(session.broker))
    gap = t_next - t_refused
    # Backoff.short(): half to all of the first step, jittered; not the grown back-off.
    assert initial / 2 <= gap <= initial + 0.15, f"{gap:.3f} s between the attempts"
    refused_client, client = brokers.clients
    assert refused_client.closed, "the refused connection's client is retired"
    assert client.address == _address(session.broker)
    assert refused_client.will is not None
    assert client.will is not None
    assert refused_client.will.json()["session"] != client.will.json()["session"]
    assert client.will.json()["session"] == session.session_id
    [error] = _messages(caplog, logging.ERROR)
    assert f"refused the connection host={refusing.host} port={refusing.port}" in error
    assert f"reason={reason}" in error
    assert f"next={session.broker} retry_in_s=" in error
    assert initial / 2 <= float(error.rpartition("retry_in_s=")[2]) <= initial


def test_the_jitter_spreads_the_short_waits(box: Outbox) -> None:
    """Pis refused at the same moment must not all come back at the same moment."""
    waits = []
    for seed in range(8):
        brokers = FakeBrokers()
        session = _session(box, brokers, backoff=Backoff(initial=0.1, cap=60))
        random.seed(seed)  # Backoff's jitter draws from the random module
        brokers.connack[_address(session.broker)] = 5
        _until(session, "a connection", lambda: session.connected, within_s=3)  # noqa: B023
        (t0, _), (t1, _) = brokers.attempts
        waits.append(t1 - t0)
        session.announce_offline()
    assert all(0.05 <= w <= 0.25 for w in waits), waits
    assert max(waits) - min(waits) > 0.01, f"no jitter: {waits}"


def test_an_unreachable_broker_is_tried_next_with_the_same_client(box: Outbox) -> None:
    brokers = FakeBrokers()
    session = _session(box, brokers)
    down = session.broker
    brokers.unreachable.add(_address(down))
    _until(session, "a connection", lambda: session.connected, within_s=2)
    [client] = brokers.clients
    assert client.address == _address(session.broker) != _address(down)
    assert [address for _, address in brokers.attempts] == [_address(down), client.address]
    assert client.will is not None
    assert client.will.json()["session"] == session.session_id, "the same session id too"


def test_a_broker_that_never_sends_the_connack_is_given_up(
    box: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(session_module, "CONNACK_WAIT_MIN_S", 0.1)
    brokers = FakeBrokers()
    session = Session(
        MqttConfig(brokers=(GW_A, GW_B), keepalive_s=1),
        node=NODE,
        outbox=box,
        clock=KernelClock(assume_synced=True),
        drain_rate_per_s=100,
        client_factory=brokers.client,
        backoff=Backoff(initial=0.02, cap=0.2),
    )
    hanging = session.broker
    brokers.silent.add(_address(hanging))
    _until(session, "a connection", lambda: session.connected, within_s=3)
    (t0, at0), (t1, at1) = brokers.attempts
    assert (at0, at1) == (_address(hanging), _address(session.broker))
    assert t1 - t0 >= 1.0, "the CONNACK is awaited for mqtt.keepalive_s"
    assert brokers.clients[0].closed
    [warning] = [m for m in _messages(caplog) if "no CONNACK" in m]
    assert f"within 1 s host={hanging.host} port={hanging.port} next={session.broker}" in warning


def test_a_lost_session_resends_everything_unacknowledged(
    box: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    brokers = FakeBrokers(auto_puback=False)
    seqs = fill(box, 10)
    session = _session(box, brokers)
    _until(session, "ten readings in flight", lambda: session.in_flight == 10)
    first = brokers.last
    first_broker = session.broker
    acked = [seqs[0], seqs[4], seqs[9]]
    first.puback(*(first.mid_of(seq) for seq in acked))
    _until(session, "three acknowledgements", lambda: session.acknowledged == 3)
    unacked = [seq for seq in seqs if seq not in acked]
    assert _pending(box) == unacked

    first.drop()
    _until(
        session,
        "a new session with the rest in flight",
        lambda: len(brokers.clients) == 2 and session.in_flight == len(unacked),
    )
    second = brokers.last
    assert first.closed
    assert second.address != first.address, "the next session goes to the other broker"
    assert _seqs(second) == unacked, "exactly the unacknowledged readings, oldest first, once"
    assert session.published == 10 + 7
    lost = next(m for m in _messages(caplog) if m.startswith("disconnected"))
    assert lost.startswith(
        f"disconnected host={first_broker.host} port={first_broker.port} reason=Unspecified error"
    )

    second.puback(*second.unacked)
    _until(session, "the outbox drained", lambda: box.depth() == 0)
    assert session.acknowledged == 10


def test_the_rate_limit_holds(box: Outbox) -> None:
    rate = 50.0
    fill(box, 300)
    brokers = FakeBrokers()
    began = time.monotonic()
    session = _session(box, brokers, drain_rate_per_s=rate, max_inflight=1000)
    until = began + 0.6
    _until(session, "0.6 s of draining", lambda: time.monotonic() > until)
    elapsed = time.monotonic() - began
    sent = len(brokers.published("sensors/"))
    assert sent == session.published
    assert sent <= rate * elapsed, f"{sent} readings in {elapsed:.2f} s at {rate}/s"
    assert sent >= rate * 0.6 * 0.5, f"only {sent} readings in {elapsed:.2f} s at {rate}/s"


def test_the_rate_limit_saves_up_at_most_one_seconds_worth(box: Outbox) -> None:
    rate = 20.0
    fill(box, 100)
    brokers = FakeBrokers()
    session = _session(box, brokers, drain_rate_per_s=rate, max_inflight=1000)
    brokers.unreachable.update({_address(GW_A), _address(GW_B)})
    _until(session, "two failed attempts", lambda: len(brokers.attempts) == 2)
    time.sleep(1.5)  # 30 readings' worth of time while no broker could be reached
    brokers.unreachable.clear()
    _until(session, "a connection", lambda: session.connected)  # its turn drained too
    assert session.published == rate, "one second's worth, not all the time spent waiting"


def test_the_window_keeps_one_slot_for_status(box: Outbox) -> None:
    brokers = FakeBrokers(auto_puback=False)
    fill(box, 20)
    session = _session(box, brokers, max_inflight=5)
    _until(session, "a connection", lambda: session.connected)
    for _ in range(5):
        _step(session)
    assert session.in_flight == 4
    session.publish_status(b'{"version":1,"node":"pi-fake","state":"online"}')
    client = brokers.last
    assert [p.topic for p in client.published][-1] == f"status/{NODE}"
    assert client.published[-1].retain
    assert len(client.unacked) == 5


def test_a_withheld_status_puback_times_out_too(box: Outbox) -> None:
    brokers = FakeBrokers()
    session = _session(box, brokers, puback_timeout_s=0.2)
    _until(session, "a connection", lambda: session.connected)
    client = brokers.last
    client.withhold(1)  # the next publish: this status
    session.publish_status(b'{"version":1,"node":"pi-fake","state":"online"}')
    _until(session, "a PUBACK timeout", lambda: session.puback_timeouts == 1)
    assert session.puback_timeout_publishes == 1
    assert client.closed
    assert box.puback_timeouts() == (1, 1)


def test_the_agent_runs_on_the_packaged_fake(box: Outbox) -> None:
    brokers = FakeBrokers()
    seqs = fill(box, 30)
    config = AgentConfig(
        node_id=NODE,
        mqtt=MqttConfig(brokers=(GW_A,)),
        outbox=OutboxConfig(path=box.path, drain_rate_per_s=10_000),
        sensors=(SensorConfig(id="sim-1", kind="simulated"),),
        heartbeat_s=3600,
    )
    agent = Agent(
        config,
        sensors=[],
        clock=KernelClock(assume_synced=True),
        outbox=box,
        client_factory=brokers.client,
        backoff=Backoff(initial=0.02, cap=0.2),
    )
    deadline = time.monotonic() + 5
    while box.depth():
        assert time.monotonic() < deadline
        agent.step(0.002)
    assert sorted(_seqs(brokers.last)) == seqs
    assert agent.acknowledged == 30
    agent.shutdown()
    statuses = [json.loads(p.payload) for p in brokers.published("status/")]
    assert [s["state"] for s in statuses] == ["online", "offline"]
    assert {s["session"] for s in statuses} == {agent.session}


def test_a_stored_reading_the_contract_refuses_is_dropped_and_counted(
    box: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbox written by an older agent may hold a reading the contract refuses (its offset
    pushed a DS18B20 past 125 °C, before values were checked against the kind's range). The
    drain must not stop at it, nor send it (the pipeline would dead-letter it): it is deleted,
    counted in dropped_total and logged, and the readings after it go out."""
    before = fill(box, 1)
    bad = box.add(
        sensor="probe",
        kind="ds18b20",
        temperature_c=125.3,
        humidity_pct=None,
        wall=time.time(),
        boot_id="b",
        boottime=1.0,
        synced=True,
    )
    after = fill(box, 2)
    brokers = FakeBrokers()
    session = _session(box, brokers)
    with caplog.at_level(logging.WARNING, logger="edge_agent.agent"):
        _until(session, "the good readings acknowledged", lambda: session.acknowledged == 3)
    assert _seqs(brokers.last) == before + after
    assert box.depth() == 0
    assert box.dropped_total() == 1
    assert box.meta("last_puback_at") is not None
    (warning,) = [m for m in _messages(caplog) if "contract refuses" in m]
    assert f"seq={bad}" in warning
    assert "temperature_c: 125.3 is outside what a ds18b20 can measure (-55..125)" in warning
