"""A daemon thread that runs one database task every few seconds and never raises.

The consumer runs two: the reader watchdog (pipeline.watchdog) and partition maintenance
(pipeline.retention). A database that is down, or a schema that lacks the function a task
calls, is logged once, then once more when the task works again; the consumer goes on.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

__all__ = ["PeriodicTask"]

log = logging.getLogger(__name__)


class PeriodicTask(threading.Thread, ABC):
    """Calls :meth:`run_once` every ``every_s`` seconds (first at once if ``at_start``)."""

    #: Says what fails, in "cannot <what> (will retry)".
    what = "run a periodic task"

    def __init__(self, name: str, *, every_s: float, at_start: bool = False) -> None:
        super().__init__(name=name, daemon=True)
        self._every_s = every_s
        self._at_start = at_start
        self._halt = threading.Event()
        self._failing = False

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        if self._at_start:
            self.check()
        while not self._halt.wait(self._every_s):
            self.check()

    def check(self) -> bool:
        """One round; False when the database could not be asked (logged, tried again)."""
        try:
            self.run_once()
        except (DBAPIError, SQLAlchemyError) as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot %s (will retry): %s", self.what, str(exc).strip().splitlines()[0]
                )
            return False
        if self._failing:
            self._failing = False
            log.info("%s works again", self.name)
        return True

    @abstractmethod
    def run_once(self) -> None:
        """The task; raises SQLAlchemy's errors when the database cannot be asked."""
