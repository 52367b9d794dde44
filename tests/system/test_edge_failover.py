"""The edge agent with two brokers: kill -9 the one it publishes to, and it carries on on the
other within seconds, losing no reading.

Two independent private RabbitMQ nodes stand in for two nodes of a cluster (MQTT clients may
connect to any node); the real `edge-agent run` process has both in `mqtt.hosts` and three
simulated sensors at 50 readings a second each. The node it connected to is killed mid-stream
(kill -9: no flush, no goodbye). Every sequence number the agent took must then be in one of
the two `readings` queues: the killed node's, after a restart (its quorum queue keeps what it
acknowledged), or the other's. Duplicates are allowed (a publish the dead node took but did
not acknowledge is sent again); a gap is not.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.harness import RabbitBroker
from tests.harness.agent_proc import AgentProcess, outbox_state, write_config
from tests.harness.procs import wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

NODE = "pi-failover"
FAILOVER_BOUND_S = 10.0
CONNECTED = re.compile(r"^(\S+ \S+) INFO \S+ connected host=(\S+) port=(\d+) ", re.M)


@pytest.fixture
def brokers() -> Iterator[tuple[RabbitBroker, RabbitBroker]]:
    pair = (
        RabbitBroker(keep=os.environ.get("KEEP_TEST_SERVICES") == "1"),
        RabbitBroker(keep=os.environ.get("KEEP_TEST_SERVICES") == "1"),
    )
    try:
        # Both boot at once: each takes 11 to 15 s on its own.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(RabbitBroker.start, pair))
        yield pair
    finally:
        for broker in pair:
            broker.close()


def _seqs(broker: RabbitBroker) -> list[int]:
    return [int(json.loads(body)["seq"]) for _, _, body in broker.drain("readings")]


def _log_time(stamp: str) -> float:
    """The agent's log time (UTC, ``2025-06-01 12:00:00,123``) as a Unix time."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC).timestamp()


def test_killing_the_broker_in_use_moves_the_agent_to_the_other_losing_nothing(
    brokers: tuple[RabbitBroker, RabbitBroker], tmp_path: Path
) -> None:
    began = time.monotonic()
    one, two = brokers
    password = secrets.token_urlsafe(12)
    creds = one.add_node(NODE, password)
    two.add_node(NODE, password)
    config = write_config(tmp_path, one, creds, interval_s=0.02)
    single = f'host = "127.0.0.1"\nport = {one.mqtt_port}\n'
    assert single in config.read_text()
    config.write_text(
        config.read_text().replace(
            single, f'hosts = ["127.0.0.1:{one.mqtt_port}", "127.0.0.1:{two.mqtt_port}"]\n'
        )
    )
    # The outbox's sequence counter starts at a random seed: the first reading is seed + 1.
    from edge_agent.outbox import Outbox  # noqa: PLC0415

    Outbox(tmp_path / "outbox.sqlite").close()
    _, seed = outbox_state(tmp_path / "outbox.sqlite")

    by_port = {one.mqtt_port: one, two.mqtt_port: two}
    agent = AgentProcess(config)
    try:
        wait_for("the agent's first session", lambda: bool(CONNECTED.search(agent.log)), 30, 0.1)
        match = CONNECTED.search(agent.log)
        assert match is not None
        used = by_port[int(match.group(3))]
        other = two if used is one else one
        wait_for("readings flowing", lambda: used.depth("readings") >= 100, 30, interval=0.2)

        on_other: list[int] = []

        def arrived_on_other() -> bool:
            on_other.extend(_seqs(other))
            return bool(on_other)

        killed_wall, killed = time.time(), time.monotonic()
        used.kill()
        wait_for("a reading on the other broker", arrived_on_other, 30, interval=0.05)
        failover_s = time.monotonic() - killed
        # From the agent's own log: when it had its session on the other broker.
        reconnects = [m for m in CONNECTED.finditer(agent.log) if int(m.group(3)) != used.mqtt_port]
        assert reconnects, agent.log[-3000:]
        session_s = _log_time(reconnects[0].group(1)) - killed_wall
        print(
            f"failover: first reading on the other broker {failover_s:.2f} s after kill -9, "
            f"its session up {session_s:.2f} s after (the agent's log)"
        )
        assert failover_s < FAILOVER_BOUND_S
        assert f"disconnected host=127.0.0.1 port={used.mqtt_port} " in agent.log
        assert f"next=127.0.0.1:{other.mqtt_port}" in agent.log

        # The agent goes on publishing there, then stops cleanly: its outbox empties.
        time.sleep(1.5)
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill()
        print(f"--- agent log ---\n{agent.log[-4000:]}")
    depth, top = outbox_state(tmp_path / "outbox.sqlite")
    assert depth == 0, "SIGTERM flushes the outbox while a broker is up"
    on_other.extend(_seqs(other))

    used.start()  # its quorum queue kept everything it acknowledged before the kill
    on_used: list[int] = []
    quiet_rounds = 0
    while quiet_rounds < 2:  # until two drains in a row find nothing more
        more = _seqs(used)
        on_used.extend(more)
        quiet_rounds = 0 if more else quiet_rounds + 1
        time.sleep(0.3)

    taken = set(range(seed + 1, top + 1))
    arrived = set(on_used) | set(on_other)
    missing = sorted(taken - arrived)
    duplicates = len(on_used) + len(on_other) - len(arrived)
    print(
        f"taken={len(taken)} on_killed={len(on_used)} on_other={len(on_other)} "
        f"duplicates={duplicates} missing={len(missing)} "
        f"test_s={time.monotonic() - began:.1f}"
    )
    assert not missing, f"{len(missing)} readings lost, first {missing[:10]}"
    assert arrived <= taken, "a sequence number the agent never took"
    assert on_used, "the killed broker had taken readings"
    assert len(set(on_other)) > 100, "the other broker took the stream"
