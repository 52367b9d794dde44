"""Database connection helpers shared by the pipeline's commands."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from pipeline.errors import ConfigError

__all__ = ["DatabaseTimeouts", "libpq_url", "make_engine"]


def _checked(url: str) -> str:
    if not url:
        raise ConfigError("DATABASE_URL is empty: set it to postgresql://user:pass@host:5432/db")
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"DATABASE_URL is not a database URL ({exc})") from exc
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(
            f"DATABASE_URL names {parsed.get_backend_name()!r}: only postgresql:// is supported"
        )
    return url


@dataclass(frozen=True, kw_only=True)
class DatabaseTimeouts:
    """How long the consumer waits for PostgreSQL before it gives up and says so.

    Without them a connection whose network path died without a word (a half-open TCP
    connection: a cable, a NAT or firewall that forgot the flow, a host that froze) blocks the
    writer until the kernel gives up, about 15 minutes of retransmissions, or for ever while it
    waits for a reply; a new connection waits about 2 minutes. Meanwhile nothing is logged and
    pipeline_database_up stays 1.

    * ``connect_s``: libpq's ``connect_timeout`` (psycopg counts at least 2 s), and the
      longest wait for a free connection of the engine's pool.
    * ``tcp_s``: a connection that sent data and got no acknowledgement for this long is
      dropped (``tcp_user_timeout``); one waiting for a reply sends a first keepalive probe
      after this long idle and then one every third of it (``keepalives_idle``,
      ``keepalives_interval``, ``keepalives_count`` 3), and Linux drops it at the first
      unanswered probe past ``tcp_user_timeout``. So a dead path is noticed after about
      ``tcp_s`` while sending and about ``4/3 tcp_s`` while waiting for a reply.
    * ``statement_s`` and ``lock_s``: the server cancels a statement that runs, or waits for a
      lock, longer than this (``statement_timeout``, ``lock_timeout``); 0 turns either off.
    * The server's side of the same connection gets the same TCP limits (its
      ``tcp_user_timeout`` and keepalives) and ends a session left idle inside a transaction
      after ``statement_s + tcp_s`` (``idle_in_transaction_session_timeout``): a consumer
      that vanished mid-transaction (a cut path, a killed host) no longer holds its locks
      until the server's own retransmissions give up, which can take minutes.

    Raises:
        ConfigError: a value is out of range (the message names the field and the value).
    """

    connect_s: int = 10
    tcp_s: int = 30
    statement_s: int = 30
    lock_s: int = 10

    def __post_init__(self) -> None:
        for name, low in (("connect_s", 1), ("tcp_s", 1), ("statement_s", 0), ("lock_s", 0)):
            value = getattr(self, name)
            if not low <= value <= 86_400:
                raise ConfigError(f"DatabaseTimeouts.{name}={value} is outside {low}..86400")

    def connect_args(self) -> dict[str, str | int]:
        """libpq connection parameters (psycopg's ``connect()`` keywords) for these limits."""
        return {
            "connect_timeout": self.connect_s,
            "keepalives": 1,
            "keepalives_idle": self.tcp_s,
            "keepalives_interval": max(1, self.tcp_s // 3),
            "keepalives_count": 3,
            "tcp_user_timeout": self.tcp_s * 1000,
            # Session settings, sent in the startup packet: no extra round trip, and they
            # hold for every connection the pool opens, after a reconnect too.
            "options": (
                f"-c statement_timeout={self.statement_s * 1000} "
                f"-c lock_timeout={self.lock_s * 1000} "
                f"-c idle_in_transaction_session_timeout={(self.statement_s + self.tcp_s) * 1000} "
                f"-c tcp_user_timeout={self.tcp_s * 1000} "
                f"-c tcp_keepalives_idle={self.tcp_s} "
                f"-c tcp_keepalives_interval={max(1, self.tcp_s // 3)} "
                "-c tcp_keepalives_count=3"
            ),
        }


def make_engine(
    url: str, *, pool_size: int = 2, timeouts: DatabaseTimeouts | None = None
) -> Engine:
    """An SQLAlchemy engine on psycopg 3 for a ``postgresql://`` URL.

    ``pool_pre_ping`` makes a connection that died with a database restart get replaced
    instead of failing the next batch. ``timeouts`` (the consumer's) bound every wait on the
    database (see :class:`DatabaseTimeouts`); without them libpq's defaults apply (no statement
    timeout, no keepalives). A parameter the URL sets itself (``?connect_timeout=5``) wins, and
    ``options`` given in the URL (or else in PGOPTIONS) are sent after the timeouts', so they
    win too.

    Raises:
        ConfigError: the URL is empty, not a URL, or not ``postgresql://``.
    """
    parsed = make_url(_checked(url)).set(drivername="postgresql+psycopg")
    if timeouts is None:
        return create_engine(parsed, pool_size=pool_size, pool_pre_ping=True, future=True)
    connect_args: dict[str, str | int] = {
        name: value
        for name, value in timeouts.connect_args().items()
        if name not in parsed.query or name == "options"
    }
    # The psycopg dialect lets connect_args replace the URL's query values, and libpq reads
    # PGOPTIONS only when no options are given: both are kept, after the timeouts.
    given = parsed.query.get("options") or os.environ.get("PGOPTIONS", "")
    if isinstance(given, tuple):
        given = " ".join(given)
    if given:
        connect_args["options"] = f"{connect_args['options']} {given}"
    return create_engine(
        parsed,
        pool_size=pool_size,
        pool_pre_ping=True,
        pool_timeout=timeouts.connect_s,
        connect_args=connect_args,
        future=True,
    )


def libpq_url(url: str) -> str:
    """The same URL in libpq's form (no SQLAlchemy driver suffix), for psycopg directly.

    Migrations connect this way, without :class:`DatabaseTimeouts`: a migration may rewrite a
    large table, and must not be cancelled halfway by the consumer's statement timeout.
    """
    parsed = make_url(_checked(url)).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)
