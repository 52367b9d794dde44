"""Database connection helpers shared by the pipeline's commands."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from pipeline.errors import ConfigError

__all__ = ["libpq_url", "make_engine"]


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


def make_engine(url: str, *, pool_size: int = 2) -> Engine:
    """An SQLAlchemy engine on psycopg 3 for a ``postgresql://`` URL.

    ``pool_pre_ping`` makes a connection that died with a database restart get replaced
    instead of failing the next batch.
    """
    parsed = make_url(_checked(url)).set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_size=pool_size, pool_pre_ping=True, future=True)


def libpq_url(url: str) -> str:
    """The same URL in libpq's form (no SQLAlchemy driver suffix), for psycopg directly."""
    parsed = make_url(_checked(url)).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)
