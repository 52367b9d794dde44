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
import threading

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

__all__ = ["ReaderWatchdog"]

log = logging.getLogger(__name__)

_CANCEL = text("SELECT cancel_overlong_reader_queries(make_interval(secs => :limit))")


class ReaderWatchdog(threading.Thread):
    """Every ``every_s`` seconds, cancel reader queries running longer than ``limit_s``.

    Never raises: a database that is down, or a schema without the function (before `pipeline
    migrate` ran), is logged once and tried again later; the consumer goes on regardless.
    """

    def __init__(self, engine: Engine, *, limit_s: float, every_s: float = 10.0) -> None:
        super().__init__(name="pipeline-reader-watchdog", daemon=True)
        self._engine = engine
        self._limit_s = limit_s
        self._every_s = every_s
        self._halt = threading.Event()
        self._failing = False
        self.cancelled = 0

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(self._every_s):
            self.check()

    def check(self) -> int:
        """One round: the number of queries cancelled now (0 when it could not ask)."""
        try:
            with self._engine.begin() as conn:
                cancelled = int(conn.execute(_CANCEL, {"limit": self._limit_s}).scalar_one())
        except (DBAPIError, SQLAlchemyError) as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot enforce the reader's time limit (will retry): %s",
                    str(exc).strip().splitlines()[0],
                )
            return 0
        if self._failing:
            self._failing = False
            log.info("enforcing the reader's time limit again limit_s=%g", self._limit_s)
        if cancelled:
            self.cancelled += cancelled
            log.warning(
                "cancelled reader queries that ran longer than the limit count=%d limit_s=%g",
                cancelled,
                self._limit_s,
            )
        return cancelled
