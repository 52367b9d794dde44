"""Prometheus metrics and the periodic log line: counts and rates, never a line per message."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "serve_metrics"]

log = logging.getLogger("pipeline.stats")

CONSUMED = Counter("pipeline_messages_consumed", "Messages received from RabbitMQ", ["queue"])
INSERTED = Counter("pipeline_readings_inserted", "Readings that became new rows")
DUPLICATES = Counter(
    "pipeline_readings_duplicate", "Readings already stored (redelivered or republished)"
)
CONFLICTS = Counter(
    "pipeline_readings_conflicting",
    "Readings refused because their (node, sensor, seq) was already stored with different content",
)
REJECTED = Counter(
    "pipeline_messages_rejected", "Messages dead-lettered because they cannot be used", ["queue"]
)
STATUSES = Counter("pipeline_status_updates", "Node status messages applied")
BATCH_SIZE = Histogram(
    "pipeline_batch_size",
    "Deliveries per committed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
COMMIT_SECONDS = Histogram(
    "pipeline_commit_seconds",
    "Time to commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DATABASE_UP = Gauge("pipeline_database_up", "1 while the last commit attempt succeeded")
BROKER_UP = Gauge("pipeline_broker_connected", "1 while connected to RabbitMQ")


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - a container port
    """Serve /metrics on ``port`` (0 disables it)."""
    if port:
        start_http_server(port, addr=addr)


@dataclass
class Metrics:
    """Counters for the periodic log line; the Prometheus ones are updated alongside.

    Two threads update the counters (the AMQP thread: consumed, rejected; the writer thread:
    the batch counters) while the AMQP thread logs and zeroes them, so every update and the
    snapshot-and-reset hold ``_lock``; an update landing between reading a counter and zeroing
    it would otherwise be lost from the log line. The lock is held for a few additions only
    and is almost never contended; the Prometheus counters have their own.
    """

    interval_s: float
    consumed: int = 0
    inserted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    statuses: int = 0
    batches: int = 0
    commit_s: float = 0.0
    _last_log: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def on_consumed(self, queue: str, count: int) -> None:
        with self._lock:
            self.consumed += count
        CONSUMED.labels(queue).inc(count)

    def on_rejected(self, queue: str, count: int = 1) -> None:
        with self._lock:
            self.rejected += count
        REJECTED.labels(queue).inc(count)

    def on_batch(
        self,
        deliveries: int,
        inserted: int,
        duplicates: int,
        statuses: int,
        seconds: float,
        *,
        conflicts: int = 0,
    ) -> None:
        with self._lock:
            self.inserted += inserted
            self.duplicates += duplicates
            self.conflicts += conflicts
            self.statuses += statuses
            self.batches += 1
            self.commit_s += seconds
        INSERTED.inc(inserted)
        DUPLICATES.inc(duplicates)
        if conflicts:
            CONFLICTS.inc(conflicts)
        STATUSES.inc(statuses)
        BATCH_SIZE.observe(deliveries)
        COMMIT_SECONDS.observe(seconds)

    def maybe_log(self, *, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if not force and elapsed < self.interval_s:
            return
        with self._lock:
            consumed, inserted, duplicates = self.consumed, self.inserted, self.duplicates
            conflicts, rejected, statuses = self.conflicts, self.rejected, self.statuses
            batches, commit_s = self.batches, self.commit_s
            self.consumed = self.inserted = self.duplicates = self.conflicts = 0
            self.rejected = self.statuses = self.batches = 0
            self.commit_s = 0.0
            self._last_log = now
        if consumed or batches or force:
            log.info(
                "stats interval_s=%.0f consumed=%d rate_per_s=%.0f inserted=%d duplicates=%d "
                "conflicts=%d rejected=%d statuses=%d batches=%d commit_ms_mean=%.1f",
                elapsed,
                consumed,
                consumed / elapsed if elapsed else 0.0,
                inserted,
                duplicates,
                conflicts,
                rejected,
                statuses,
                batches,
                1000 * commit_s / batches if batches else 0.0,
            )
