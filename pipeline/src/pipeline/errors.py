"""The pipeline's exceptions: one root, subclasses that are also the built-in type they resemble."""

from __future__ import annotations

__all__ = ["ConfigError", "MigrationError", "PipelineError", "Rejected", "SessionBrokenError"]


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A setting is missing or has a value the pipeline cannot use; the message names it."""


class MigrationError(PipelineError, RuntimeError):
    """The database schema could not be brought to the current version."""


class Rejected(PipelineError, ValueError):  # noqa: N818 - names the outcome, as AMQP does
    """A message that can never become a row; it is dead-lettered with ``reason``.

    ``reason`` names the field and the offending value, e.g.
    ``temperature_c: 130.5 is outside what a ds18b20 can measure (-55..125)``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionBrokenError(PipelineError, RuntimeError):
    """A consumer session cannot go on safely; it ends so that its deliveries are redelivered."""
