"""`edge-agent run` as a real process with a throwaway configuration."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path

from tests.harness.procs import ManagedProcess
from tests.harness.rabbit import NodeCredentials, RabbitBroker


def outbox_state(path: Path) -> tuple[int, int]:
    """(rows waiting, highest sequence number ever handed out) of an agent's outbox file."""
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        depth = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0]
    return int(depth), int(top)


def write_config(
    directory: Path,
    broker: RabbitBroker,
    creds: NodeCredentials,
    *,
    interval_s: float = 0.05,
    sensors: int = 3,
    drain_rate: float = 2000,
    heartbeat_s: float = 1,
    seed_base: int = 0,
    extra: str = "",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[node]",
        f'id = "{creds.username}"',
        "[mqtt]",
        'host = "127.0.0.1"',
        f"port = {broker.mqtt_port}",
        f'password = "{creds.password}"',
        "keepalive_s = 10",
        "[outbox]",
        f'path = "{directory / "outbox.sqlite"}"',
        f"drain_rate_per_s = {drain_rate}",
        "[clock]",
        # The test machines' kernels report an unsynchronised clock.
        "require_sync = false",
        "[agent]",
        f"heartbeat_s = {heartbeat_s}",
        "shutdown_flush_s = 5",
    ]
    for n in range(1, sensors + 1):
        lines += [
            "[[sensors]]",
            f'id = "sim-{n}"',
            'kind = "simulated"',
            f"interval_s = {interval_s}",
            f"seed = {seed_base + n}",
            f"humidity = {'true' if n == 3 else 'false'}",
        ]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class AgentProcess(ManagedProcess):
    """`edge-agent run --config CONFIG`, its log next to the configuration."""

    def __init__(self, config: Path) -> None:
        self.config = config
        super().__init__(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            config.with_suffix(".log"),
            dict(os.environ),
        )
