"""`edge-agent run` as a real process with a throwaway configuration."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.harness.rabbit import NodeCredentials, RabbitBroker


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


class AgentProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.with_suffix(".log")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
