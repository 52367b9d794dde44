"""Every accepted ``mqtt.max_inflight`` (1..1000) sends readings (issue 13, item 2).

The agent keeps one slot of paho's in-flight window for status messages. With a window of 1
that left no room for readings at all: nothing was ever published and the outbox grew until
it dropped. Now a window of 1 carries readings one at a time, and a status waits behind the
reading in flight (paho queues a publish beyond its window and sends it on the next PUBACK).
The fake broker here plays that part of paho; tests/system/test_edge_agent.py runs the same
setting against the real RabbitMQ and the real paho client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.outbox import Outbox
from tests.unit.edge.agents import fake_agent, fill
from tests.unit.edge.fake_mqtt import FakeBroker


def _agent(box: Outbox, broker: FakeBroker, window: int, heartbeat_s: float = 3600) -> Agent:
    return fake_agent(
        box,
        broker,
        node="pi-window",
        max_inflight=window,
        puback_timeout_s=5,
        heartbeat_s=heartbeat_s,
        sensors=[],
    )


def _run_until(agent: Agent, what: str, done: Callable[[], bool], within_s: float = 5) -> list[int]:
    """Step until ``done``; return how many readings were in flight after each step."""
    inflight = []
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s} s"
        agent.step(0.002)
        inflight.append(agent.mqtt_session.in_flight)
    return inflight


def test_a_window_of_one_publishes_every_reading_and_gets_it_acknowledged(
    tmp_path: Path,
) -> None:
    broker = FakeBroker(window=1)
    with Outbox(tmp_path / "o.sqlite") as box:
        seqs = fill(box, 20)
        agent = _agent(box, broker, window=1, heartbeat_s=0.01)
        inflight = _run_until(agent, "the outbox drained", lambda: box.depth() == 0)
        assert broker.stored == seqs, "each reading once, oldest first"
        assert agent.acknowledged == 20
        assert max(inflight) == 1
        assert broker.most_outstanding == 1, "never more than paho's window on the wire"
        # The statuses (online, then heartbeats) got through too, queued behind readings.
        states = [status["state"] for _, status in broker.statuses]
        assert states[0] == "online"
        assert len(states) >= 2
        agent.shutdown()
        assert broker.statuses[-1][1]["state"] == "offline"


@pytest.mark.parametrize("window", [2, 3, 10])
def test_a_wider_window_keeps_one_slot_for_the_status(tmp_path: Path, window: int) -> None:
    broker = FakeBroker(window=window)
    with Outbox(tmp_path / "o.sqlite") as box:
        seqs = fill(box, 50)
        agent = _agent(box, broker, window=window)
        inflight = _run_until(agent, "the outbox drained", lambda: box.depth() == 0)
        assert sorted(set(broker.stored)) == seqs
        assert max(inflight) == window - 1
        agent.shutdown()
