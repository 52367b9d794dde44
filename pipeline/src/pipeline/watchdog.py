"""The reader's time limit, enforced: cancel read-only queries that run too long.

The read-only role (people, Grafana) gets ``statement_timeout = 60s`` as its role default
(gateway/postgres/init-roles.sh), but that is only a default: a session may ``SET
statement_timeout = 0`` and hold the database for as long as it likes. So every consumer, as
the writer role, calls ``cancel_overlong_reader_queries(limit)`` (migration 0004) every few
seconds: that function runs with the schema owner's rights and cancels the active queries of
``tempmon_reader`` members that have run longer than the limit, and nothing else. Two
replicas doing it at once cancel nothing twice: a cancelled query is no longer active.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.engine import Engine

from pipeline.periodic import PeriodicTask

__all__ = ["ReaderWatchdog"]

log = logging.getLogger(__name__)

_CANCEL = text("SELECT cancel_overlong_reader_queries(make_interval(secs => :limit))")


class ReaderWatchdog(PeriodicTask):
    """Every ``every_s`` seconds, cancel reader queries running longer than ``limit_s``.

    Never raises: a database that is down, or a schema without the function (before `pipeline
    migrate` ran), is logged once and tried again later; the consumer goes on regardless.
    """

    what = "enforce the reader's time limit"

    def __init__(self, engine: Engine, *, limit_s: float, every_s: float = 10.0) -> None:
        super().__init__("pipeline-reader-watchdog", every_s=every_s)
        self._engine = engine
        self._limit_s = limit_s
        self.cancelled = 0

    def run_once(self) -> None:
        with self._engine.begin() as conn:
            cancelled = int(conn.execute(_CANCEL, {"limit": self._limit_s}).scalar_one())
        if cancelled:
            self.cancelled += cancelled
            log.warning(
                "cancelled reader queries that ran longer than the limit count=%d limit_s=%g",
                cancelled,
                self._limit_s,
            )
