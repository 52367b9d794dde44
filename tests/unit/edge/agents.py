"""Agents and outboxes for the unit tests: one way to build them, on the fake broker."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from edge_agent.agent import Agent, Backoff
from edge_agent.clock import KernelClock
from edge_agent.config import AgentConfig, MqttConfig, OutboxConfig, SensorConfig
from edge_agent.outbox import Outbox
from edge_agent.sensors import Sensor, Simulated
from tests.unit.edge.fake_mqtt import FakeBroker


def fake_agent(
    box: Outbox,
    broker: FakeBroker,
    *,
    node: str,
    max_inflight: int,
    puback_timeout_s: float,
    heartbeat_s: float = 3600,
    shutdown_flush_s: float = 5.0,
    sensors: list[Sensor] | None = None,
    backoff: Backoff | None = None,
) -> Agent:
    """An agent on ``box`` talking to the fake ``broker``, with a short back-off.

    ``sensors`` defaults to one simulated sensor ``sim-1``; pass ``[]`` for an agent that only
    drains what the test put into the outbox.
    """
    config = AgentConfig(
        node_id=node,
        mqtt=MqttConfig(max_inflight=max_inflight, puback_timeout_s=puback_timeout_s),
        outbox=OutboxConfig(path=box.path, drain_rate_per_s=10_000),
        sensors=(SensorConfig(id="sim-1", kind="simulated"),),
        heartbeat_s=heartbeat_s,
        shutdown_flush_s=shutdown_flush_s,
    )
    return Agent(
        config,
        sensors=[Simulated("sim-1", seed=1)] if sensors is None else sensors,
        clock=KernelClock(assume_synced=True),
        outbox=box,
        client_factory=broker.client,  # type: ignore[arg-type]  # the fake's duck type
        backoff=backoff or Backoff(initial=0.02, cap=0.2),
    )


def fill(box: Outbox, count: int) -> list[int]:
    """Add ``count`` readings of ``sim-1`` taken now with a synchronised clock; their seqs."""
    return [
        box.add(
            sensor="sim-1",
            kind="simulated",
            temperature_c=21.5,
            humidity_pct=None,
            wall=time.time(),
            boot_id="b",
            boottime=1.0,
            synced=True,
        )
        for _ in range(count)
    ]


def sequence_counter(path: Path) -> int:
    """The outbox file's AUTOINCREMENT counter: the last sequence number handed out."""
    conn = sqlite3.connect(path)
    try:
        return int(
            conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0]
        )
    finally:
        conn.close()
