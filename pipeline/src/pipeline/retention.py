"""Retention: how long each level of data is kept, and the partitions that hold it.

``readings`` is partitioned by day, ``readings_minute`` by month and ``readings_10min`` by
year (migration 0006). ``maintain_partitions()``, a database function, creates the
partitions ahead and drops those wholly past their level's retention; old data never goes by
DELETE. The consumers call it at start and every hour (:class:`PartitionMaintainer`),
``pipeline maintain`` on demand.

The retention itself is data in ``data_retention`` that only the schema's owner may change:
``pipeline migrate`` writes it from ``PIPELINE_RETENTION_RAW_DAYS``,
``PIPELINE_RETENTION_MINUTE_DAYS`` and ``PIPELINE_RETENTION_10MIN_DAYS`` when they are set.
The writer role may trigger maintenance but cannot choose what it drops.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, text

from pipeline.db import libpq_url, make_engine
from pipeline.errors import ConfigError
from pipeline.periodic import PeriodicTask

__all__ = [
    "Action",
    "PartitionMaintainer",
    "RetentionPolicy",
    "apply_policy",
    "maintain",
    "retention_state",
    "settle",
]

log = logging.getLogger(__name__)

_LEVELS = ("raw", "minute", "10min")
_ENV = {
    "raw": "PIPELINE_RETENTION_RAW_DAYS",
    "minute": "PIPELINE_RETENTION_MINUTE_DAYS",
    "10min": "PIPELINE_RETENTION_10MIN_DAYS",
}
# The largest retention data_retention takes (its CHECK): about 270 years.
_MAX_DAYS = 100_000


@dataclass(frozen=True)
class RetentionPolicy:
    """Days each level is kept; None: for ever. Finer levels never outlive coarser ones.

    Raises:
        ConfigError: a value is out of range, or a finer level is kept longer than a coarser
            one (the summary falls back from raw rows to minutes to ten-minute buckets, so
            each must reach at least as far back as the one before it).
    """

    raw_days: int | None = 30
    minute_days: int | None = 400
    tenmin_days: int | None = None

    def __post_init__(self) -> None:
        values = dict(zip(_LEVELS, self.days(), strict=True))
        for level, days in values.items():
            if days is not None and not 1 <= days <= _MAX_DAYS:
                raise ConfigError(
                    f"{_ENV[level]}={days} is outside 1..{_MAX_DAYS} (0 keeps for ever)"
                )
        for finer, coarser in (("raw", "minute"), ("minute", "10min")):
            short, long = values[finer], values[coarser]
            if long is not None and (short is None or short > long):
                raise ConfigError(
                    f"{_ENV[finer]}={_shown(short)} keeps {finer} data longer than "
                    f"{_ENV[coarser]}={_shown(long)} keeps {coarser} data: each level must be "
                    "kept at most as long as the coarser one after it"
                )

    def days(self) -> tuple[int | None, int | None, int | None]:
        return (self.raw_days, self.minute_days, self.tenmin_days)

    @classmethod
    def from_env(cls, env: Mapping[str, str], base: RetentionPolicy) -> RetentionPolicy:
        """``base`` with what the environment sets.

        Raises:
            ConfigError: a value is malformed or out of range, or the levels are out of
                order (the message names the variables and their values).
        """
        days = dict(zip(_LEVELS, base.days(), strict=True))
        days.update(cls.parse_env(env))
        return cls(days["raw"], days["minute"], days["10min"])

    @staticmethod
    def parse_env(env: Mapping[str, str]) -> dict[str, int | None]:
        """The levels the environment sets, by level; "0" or "forever" keeps for ever.

        Raises:
            ConfigError: a value is not a whole number of days, or is out of range.
        """
        days: dict[str, int | None] = {}
        for level, name in _ENV.items():
            raw = env.get(name, "").strip()
            if not raw:
                continue
            if raw.lower() == "forever" or (raw.isascii() and raw.isdigit() and int(raw) == 0):
                days[level] = None
            elif raw.isascii() and raw.isdigit():
                if int(raw) > _MAX_DAYS:
                    raise ConfigError(f"{name}={raw} is outside 1..{_MAX_DAYS} (0 keeps for ever)")
                days[level] = int(raw)
            else:
                raise ConfigError(f"{name}={raw!r} is not a whole number of days (0: for ever)")
        return days

    @staticmethod
    def set_in(env: Mapping[str, str]) -> bool:
        """Whether the environment sets any retention at all."""
        return any(env.get(name, "").strip() for name in _ENV.values())


def _shown(days: int | None) -> str:
    return "0 (for ever)" if days is None else str(days)


@dataclass(frozen=True)
class Action:
    """One partition maintain_partitions() created, dropped, or could not drop yet."""

    action: str
    partition: str
    lo: datetime | None
    hi: datetime | None


_MAINTAIN = text(
    "SELECT action, partition, nullif(lo, '-infinity'), nullif(hi, 'infinity')"
    " FROM maintain_partitions()"
)

_STATE = text(
    "SELECT level, tbl, unit, keep_days, nullif(kept_from, '-infinity') AS kept_from,"
    " nullif(stored_from, '-infinity') AS stored_from,"
    " nullif(stored_to, 'infinity') AS stored_to, legacy_to"
    " FROM data_retention ORDER BY keep_days NULLS LAST"
)


def maintain(conn: Connection) -> list[Action]:
    """Run maintain_partitions() once, in its own transaction; what it did."""
    with conn.begin():
        actions = [Action(*row) for row in conn.execute(_MAINTAIN)]
    for a in actions:
        log.info("partition %s name=%s from=%s to=%s", a.action, a.partition, a.lo, a.hi)
    return actions


def retention_state(conn: Connection) -> list[dict[str, Any]]:
    """data_retention as rows (a reader may ask)."""
    with conn.begin():
        return [dict(row._mapping) for row in conn.execute(_STATE)]


def apply_policy(libpq_url: str, policy: RetentionPolicy) -> None:
    """Write ``policy`` into data_retention; needs the schema's owner (migrations do)."""
    with psycopg.connect(libpq_url) as conn:
        for level, days in zip(_LEVELS, policy.days(), strict=True):
            conn.execute("UPDATE data_retention SET keep_days = %s WHERE level = %s", (days, level))
    log.info(
        "retention set raw_days=%s minute_days=%s 10min_days=%s",
        *(_shown(d) for d in policy.days()),
    )


def settle(
    url: str, env: Mapping[str, str] | None = None
) -> tuple[list[Action], list[dict[str, Any]]]:
    """`pipeline migrate` and `pipeline maintain`: apply the retention the environment sets,
    if ``env`` is given and sets any (needs the owner role), then maintain the partitions once.
    Returns what maintenance did and data_retention afterwards.

    Raises:
        ConfigError: the environment's retention is malformed or out of order.
    """
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if env is not None and RetentionPolicy.set_in(env):
                stored = {row["level"]: row["keep_days"] for row in retention_state(conn)}
                base = RetentionPolicy(stored["raw"], stored["minute"], stored["10min"])
                apply_policy(libpq_url(url), RetentionPolicy.from_env(env, base))
            return maintain(conn), retention_state(conn)
    finally:
        engine.dispose()


class PartitionMaintainer(PeriodicTask):
    """Runs maintain_partitions() at start and every ``every_s`` seconds (default an hour).

    Partitions are made a week ahead, so a consumer that could not maintain for days still
    stores every reading; a writer that meets a reading past them calls the function itself
    (pipeline.store).
    """

    what = "maintain the partitions"

    def __init__(self, engine: Engine, *, every_s: float = 3600.0) -> None:
        super().__init__("pipeline-partition-maintainer", every_s=every_s, at_start=True)
        self._engine = engine
        self.actions: list[Action] = []

    def run_once(self) -> None:
        with self._engine.connect() as conn:
            self.actions.extend(maintain(conn))
