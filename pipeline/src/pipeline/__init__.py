"""The gateway's pipeline: RabbitMQ readings into PostgreSQL exactly once."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pipeline.errors import ConfigError, MigrationError, PipelineError, Rejected

__all__ = ["ConfigError", "MigrationError", "PipelineError", "Rejected", "__version__"]

try:
    __version__ = version("tempmon-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
