"""The edge agent: sensor readings on a Raspberry Pi, through a durable outbox, to MQTT."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from edge_agent.errors import ConfigError, EdgeError, SensorError

__all__ = ["ConfigError", "EdgeError", "SensorError", "__version__"]

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
