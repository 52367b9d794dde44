"""The edge agent's exceptions: one root; subclasses also inherit the built-in they resemble."""

from __future__ import annotations

__all__ = ["ConfigError", "EdgeError", "SensorError"]


class EdgeError(Exception):
    """Root of every error the edge agent raises on purpose."""


class ConfigError(EdgeError, ValueError):
    """A configuration key is missing or has a value the agent cannot use; the message names it."""


class SensorError(EdgeError, OSError):
    """A sensor could not be read; the message says which one and what to check."""
