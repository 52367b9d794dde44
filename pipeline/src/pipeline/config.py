"""The consumer's settings, read once from the environment and checked at start."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pipeline.db import DatabaseTimeouts
from pipeline.errors import ConfigError
from pipeline.origin import derive_key

__all__ = ["ConsumerSettings", "has_password", "redact"]

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
    # Connections that commit batches side by side (pipeline.consumer.Writer); 1: in order.
    db_writers: int = 2
    metrics_port: int = 9102
    log_interval_s: int = 60
    # Reader queries running longer are cancelled (pipeline.watchdog); 0 turns that off.
    reader_query_limit_s: int = 60
    # maintain_partitions() at start and this often (pipeline.retention); 0 turns it off.
    maintain_interval_s: int = 3600
    # How long the consumer waits for PostgreSQL (pipeline.db.DatabaseTimeouts): connecting,
    # a silent network path, one statement, one lock; 0 turns the last two off.
    db_connect_timeout_s: int = 10
    db_tcp_timeout_s: int = 30
    db_statement_timeout_s: int = 30
    db_lock_timeout_s: int = 10
    readings_queue: str = "readings"
    status_queue: str = "node-status"
    dead_queue: str = "readings.dead"
    status_dead_queue: str = "node-status.dead"
    # Signs the origin of dead letters and replays (pipeline.origin); None: nothing is signed,
    # and no replayed message keeps its original routing key.
    dead_letter_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.rabbitmq_url.startswith(("amqp://", "amqps://")):
            raise ConfigError(
                f"RABBITMQ_URL={redact(self.rabbitmq_url)!r} must start with amqp:// or amqps://"
            )
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set: postgresql://user@host:5432/db")
        if self.prefetch < self.batch_size:
            raise ConfigError(
                f"PIPELINE_PREFETCH={self.prefetch} is smaller than PIPELINE_BATCH_SIZE="
                f"{self.batch_size}: a batch could never fill; use at least twice the batch size"
            )
        self.database_timeouts  # noqa: B018 - checks the values now, not at the first connect

    @property
    def database_timeouts(self) -> DatabaseTimeouts:
        """The limits for the consumer's engine: ``make_engine(url, timeouts=...)``."""
        return DatabaseTimeouts(
            connect_s=self.db_connect_timeout_s,
            tcp_s=self.db_tcp_timeout_s,
            statement_s=self.db_statement_timeout_s,
            lock_s=self.db_lock_timeout_s,
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
            dead_letter_key=_dead_letter_key(env, url),
            database_url=env.get("DATABASE_URL", ""),
            prefetch=_int(env, "PIPELINE_PREFETCH", 3000, 1, 65535),
            batch_size=_int(env, "PIPELINE_BATCH_SIZE", 1000, 1, 50_000),
            batch_ms=_int(env, "PIPELINE_BATCH_MS", 100, 1, 60_000),
            db_writers=_int(env, "PIPELINE_DB_WRITERS", 2, 1, 8),
            metrics_port=_int(env, "PIPELINE_METRICS_PORT", 9102, 0, 65535),
            log_interval_s=_int(env, "PIPELINE_LOG_INTERVAL_S", 60, 1, 86_400),
            reader_query_limit_s=_int(env, "PIPELINE_READER_QUERY_LIMIT_S", 60, 0, 86_400),
            maintain_interval_s=_int(env, "PIPELINE_MAINTAIN_INTERVAL_S", 3600, 0, 86_400),
            db_connect_timeout_s=_int(env, "PIPELINE_DB_CONNECT_TIMEOUT_S", 10, 1, 600),
            db_tcp_timeout_s=_int(env, "PIPELINE_DB_TCP_TIMEOUT_S", 30, 1, 600),
            db_statement_timeout_s=_int(env, "PIPELINE_DB_STATEMENT_TIMEOUT_S", 30, 0, 86_400),
            db_lock_timeout_s=_int(env, "PIPELINE_DB_LOCK_TIMEOUT_S", 10, 0, 86_400),
        )


# A query parameter that carries a password in a libpq URL (`?password=...`, `&sslpassword=...`).
_QUERY_PASSWORD: Final = re.compile(r"(?i)([?&][^=&#]*password=)[^&#]*")


_MIN_KEY_CHARS: Final = 16


def _dead_letter_key(env: Mapping[str, str], rabbitmq_url: str) -> bytes | None:
    """The key that signs dead-letter origins: PIPELINE_DEAD_LETTER_KEY, else the AMQP password.

    Every replica must have the same key (they share the AMQP account, so the default does) and
    no node may know it (nodes have their own accounts). Changing the AMQP password changes the
    default key: dead letters signed before can then no longer be replayed under their node,
    unless PIPELINE_DEAD_LETTER_KEY is set to a fixed secret, which then outlives password
    changes. Without either there is no secret to sign with, and None is returned.

    Raises:
        ConfigError: PIPELINE_DEAD_LETTER_KEY is set but shorter than 16 characters (its value
            is never shown).
    """
    explicit = env.get("PIPELINE_DEAD_LETTER_KEY", "")
    if explicit:
        if len(explicit) < _MIN_KEY_CHARS:
            raise ConfigError(
                f"PIPELINE_DEAD_LETTER_KEY is {len(explicit)} characters long: use at least "
                f"{_MIN_KEY_CHARS} random ones (for example `openssl rand -hex 32`), or unset it "
                "to derive the key from the AMQP password"
            )
        return derive_key(explicit)
    span = _userinfo_end(rabbitmq_url)
    if span is None:
        return None
    password = unquote(rabbitmq_url[span[0] : span[1]])
    return derive_key(password) if password else None


def _userinfo_end(url: str) -> tuple[int, int] | None:
    """Where the password of ``scheme://user:password@host...`` starts and ends, if it has one.

    Not ``urlsplit``: it ends the host part at the first ``/``, ``?`` or ``#``, so an unescaped
    ``amqp://user:pa/ss@host`` would look password-less and be logged whole. A password may
    hold any character, ``@`` included, so the user information runs to the last ``@`` of the
    URL. That can take too much (a URL whose path or query holds an ``@`` loses its host in the
    redacted text), never too little.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    at = url.rfind("@", start)
    if at < 0:
        return None
    colon = url.find(":", start, at)
    if colon < 0:
        return None
    return colon + 1, at


def has_password(url: str) -> bool:
    """True if ``url`` carries a password, in its user information or as a query parameter."""
    return _userinfo_end(url) is not None or _QUERY_PASSWORD.search(url) is not None


def redact(url: str) -> str:
    """The URL with every password replaced by ``***``, for logs and errors.

    Works whatever the password holds (``/``, ``#``, ``?``, ``@``, ``:``, percent escapes):
    see :func:`_userinfo_end`. A ``password=`` query parameter (libpq reads one) is hidden too.
    """
    span = _userinfo_end(url)
    if span is not None:
        url = url[: span[0]] + "***" + url[span[1] :]
        host_start = span[0] + 4  # the query can only follow the host
    else:
        host_start = 0
    return url[:host_start] + _QUERY_PASSWORD.sub(r"\1***", url[host_start:])
