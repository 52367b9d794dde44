"""Withheld PUBACKs: the agent ends the session, counts it, and sends everything again later.

RabbitMQ 4.x answers a QoS 1 publish that a full queue refuses (``overflow = reject-publish``)
with no PUBACK at all and keeps the connection open; MQTT 3.1.1 has no negative
acknowledgement. These tests drive the agent's session through its ``client_factory`` seam with
a fake broker that behaves that way, so the timeout logic runs in milliseconds here; the real
brokers are in tests/system/test_broker_limits.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.agent import Agent, Backoff
from edge_agent.cli import main
from edge_agent.outbox import Outbox
from tests.unit.edge.agents import fake_agent, fill
from tests.unit.edge.fake_mqtt import FakeBroker

NODE = "pi-full"
TIMEOUT_S = 0.3
WINDOW = 10  # max_inflight: the agent keeps one slot for its status, so 9 readings at a time


def _agent(box: Outbox, broker: FakeBroker, backoff: Backoff | None = None) -> Agent:
    return fake_agent(
        box, broker, node=NODE, max_inflight=WINDOW, puback_timeout_s=TIMEOUT_S, backoff=backoff
    )


def _run_until(agent: Agent, what: str, done: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s} s"
        agent.step(0.005)


def test_withheld_pubacks_end_the_session_and_every_reading_is_sent_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FakeBroker()
    broker.refusing = True
    with Outbox(tmp_path / "o.sqlite") as box:
        seqs = fill(box, 30)
        agent = _agent(box, broker)
        caplog.set_level(logging.INFO, logger="edge_agent")
        _run_until(agent, "a full window", lambda: len(broker.refused) == WINDOW - 1, 5)
        # The window is full of publishes the broker swallowed; before the timeout the agent
        # waits, and deletes nothing.
        started = time.monotonic()
        for _ in range(10):
            agent.step(0.005)
        assert time.monotonic() - started < TIMEOUT_S
        assert agent.connected
        assert agent.puback_timeouts == 0
        assert len(broker.refused) == WINDOW - 1, "published beyond the window"
        _run_until(agent, "a PUBACK timeout", lambda: agent.puback_timeouts == 1, 5)
        assert time.monotonic() - started >= TIMEOUT_S * 0.5
        # The session ended: its client said DISCONNECT and is never used again.
        first = broker.clients[0]
        assert first.closed
        assert first.disconnects == 1
        assert not agent.connected
        # Nothing left the outbox without its PUBACK.
        assert box.depth() == 30
        assert agent.acknowledged == 0
        assert box.puback_timeouts() == (1, WINDOW - 1)
        assert agent.puback_timeout_publishes == WINDOW - 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings  # one line per episode, not one per reading
        assert "broker withholding acknowledgements" in warnings[0]
        assert f"unacknowledged={WINDOW - 1}" in warnings[0]
        assert f"oldest_seq={seqs[0]}" in warnings[0]
        assert "full queue" in warnings[0]
        assert "retry_in_s=" in warnings[0]

        # The queue has room again: the next session sends everything, oldest first.
        broker.refusing = False
        _run_until(agent, "the outbox drained", lambda: box.depth() == 0, 5)
        assert len(broker.clients) == 2, "one new client for the new session"
        assert sorted(set(broker.stored)) == seqs
        assert broker.stored[: WINDOW - 1] == seqs[: WINDOW - 1], "resent from the oldest"
        assert set(broker.refused) <= set(broker.stored)
        assert agent.acknowledged == 30
        assert agent.puback_timeouts == 1
        agent.shutdown()


def test_repeated_timeouts_back_off(tmp_path: Path) -> None:
    """A queue that stays full is not hammered: each new session waits longer than the last."""
    broker = FakeBroker()
    broker.refusing = True
    initial = 0.05
    with Outbox(tmp_path / "o.sqlite") as box:
        fill(box, 30)
        agent = _agent(box, broker, Backoff(initial=initial, cap=10.0))
        ended: list[float] = []
        began: list[float] = []
        sessions = 0
        deadline = time.monotonic() + 15
        while len(began) < 4:
            assert time.monotonic() < deadline
            timeouts = agent.puback_timeouts
            clients = len(broker.clients)
            before = time.monotonic()  # the back-off is scheduled after this, never before
            agent.step(0.005)
            if agent.puback_timeouts > timeouts:
                ended.append(before)
            if len(broker.clients) > clients:
                sessions += 1
                if sessions > 1:
                    began.append(time.monotonic())
        gaps = [b - e for e, b in zip(ended, began, strict=True)]
        # Back-off delays of initial * 2**n, jittered down to half at most, never reset.
        for n, gap in enumerate(gaps):
            assert gap >= initial * 2**n / 2, gaps
        assert box.depth() == 30
        assert box.puback_timeouts()[0] == 4
        agent.shutdown()


def test_a_broker_that_acknowledges_keeps_the_session(tmp_path: Path) -> None:
    """Acknowledged publishes never trip the timeout, however long the session runs."""
    broker = FakeBroker()
    with Outbox(tmp_path / "o.sqlite") as box:
        agent = _agent(box, broker)
        ended = time.monotonic() + 4 * TIMEOUT_S
        while time.monotonic() < ended:
            fill(box, 5)
            agent.step(0.005)
        _run_until(agent, "the outbox drained", lambda: box.depth() == 0, 5)
        assert agent.connected
        assert len(broker.clients) == 1
        assert agent.puback_timeouts == 0
        assert box.puback_timeouts() == (0, 0)
        agent.shutdown()


def test_status_shows_the_puback_timeouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box_path = tmp_path / "outbox.sqlite"
    with Outbox(box_path) as box:
        box.count_puback_timeout(99, now_wall=1_800_000_000.0)
        box.count_puback_timeout(40, now_wall=1_800_000_060.0)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[node]\nid = "{NODE}"\n[outbox]\npath = "{box_path}"\n'
        '[[sensors]]\nid = "sim-1"\nkind = "simulated"\n'
    )
    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["puback_timeouts"] == 2
    assert status["puback_timeout_publishes"] == 139
    assert status["last_puback_timeout"].startswith("2027-01-15T08:01:00")
    assert main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "puback_timeouts" in text
