"""The consumer's settings, read once from the environment and checked at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.errors import ConfigError

__all__ = ["ConsumerSettings"]

_DEFAULT_RABBITMQ_URL = "amqp://localhost:5672/%2F"


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def _with_credentials(url: str, user: str | None, password: str | None) -> str:
    """Put RABBITMQ_USER / RABBITMQ_PASSWORD into the URL, escaped, if they are given."""
    if not user and not password:
        return url
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    userinfo = quote(user or parts.username or "", safe="")
    if password:
        userinfo += ":" + quote(password, safe="")
    return urlunsplit((parts.scheme, f"{userinfo}@{netloc}", parts.path, parts.query, ""))


@dataclass(frozen=True, kw_only=True)
class ConsumerSettings:
    """Everything ``pipeline consume`` needs; see the README's configuration reference."""

    rabbitmq_url: str
    database_url: str
    prefetch: int = 3000
    batch_size: int = 1000
    batch_ms: int = 100
    metrics_port: int = 9102
    log_interval_s: int = 60
    readings_queue: str = "readings"
    status_queue: str = "node-status"
    dead_queue: str = "readings.dead"
    status_dead_queue: str = "node-status.dead"

    def __post_init__(self) -> None:
        if not self.rabbitmq_url.startswith(("amqp://", "amqps://")):
            raise ConfigError(
                f"RABBITMQ_URL={_redact(self.rabbitmq_url)!r} must start with amqp:// or amqps://"
            )
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set: postgresql://user@host:5432/db")
        if self.prefetch < self.batch_size:
            raise ConfigError(
                f"PIPELINE_PREFETCH={self.prefetch} is smaller than PIPELINE_BATCH_SIZE="
                f"{self.batch_size}: a batch could never fill; use at least twice the batch size"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsumerSettings:
        """Read the settings; raise ConfigError naming the variable and value that is wrong."""
        url = _with_credentials(
            env.get("RABBITMQ_URL", _DEFAULT_RABBITMQ_URL),
            env.get("RABBITMQ_USER"),
            env.get("RABBITMQ_PASSWORD"),
        )
        return cls(
            rabbitmq_url=url,
            database_url=env.get("DATABASE_URL", ""),
            prefetch=_int(env, "PIPELINE_PREFETCH", 3000, 1, 65535),
            batch_size=_int(env, "PIPELINE_BATCH_SIZE", 1000, 1, 50_000),
            batch_ms=_int(env, "PIPELINE_BATCH_MS", 100, 1, 60_000),
            metrics_port=_int(env, "PIPELINE_METRICS_PORT", 9102, 0, 65535),
            log_interval_s=_int(env, "PIPELINE_LOG_INTERVAL_S", 60, 1, 86_400),
        )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs and errors."""
    return _redact(url)
