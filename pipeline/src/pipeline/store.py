"""Writing batches to PostgreSQL: one transaction per batch, idempotent on the natural key.

One statement inserts the batch with ``ON CONFLICT DO NOTHING`` and, from the rows that really
inserted (``RETURNING``), updates the per-minute and ten-minute rollups and the latest reading
per sensor. A redelivered batch therefore changes nothing twice. A batch is first tried with a
plain INSERT, cheaper for the database; if one of its keys is stored already, that fails
without changing anything, and the batch runs with ``ON CONFLICT DO NOTHING``. Rows are
sorted by key before they are sent, and every upsert visits its keys in sorted order, so
concurrent consumers wait for each other instead of deadlocking on rollup rows.

``readings`` is partitioned by day (migration 0006), and each partition has its own unique key
on (node, sensor, seq), the arbiter of ``ON CONFLICT``: a redelivery carries the same ts, so it
meets its original there. A key stored in another partition is found through
``node_seq_ranges`` (per node and partition, the range of sequence numbers stored), which the
same statement keeps; in-order readings fall in no other partition's range and cost no
lookup. Readings outside the days the partitions hold are refused before the statement, with
a reason, and a store that meets a reading past the partitions made ahead makes them first.

A key that is already stored is a duplicate only if the content is the same: when the insert
took fewer rows than it was given, one more query tells a redelivery from a reused sequence
number, which is refused (dead-lettered by the caller), never silently dropped. Node statuses
follow the session rule of ``_WRITE_STATUSES``, so a node's status never goes backwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError

from pipeline.decode import NodeStatus, Reading

__all__ = ["BatchResult", "Store"]

# The natural key (node, sensor, seq): batches are written in this order.
_KEY = itemgetter(0, 1, 3)

log = logging.getLogger(__name__)

# An upsert into a rollup table adds the batch's aggregates to the stored ones.
_MERGE_AGGREGATES = """
        n = r.n + EXCLUDED.n,
        sum_c = r.sum_c + EXCLUDED.sum_c,
        min_c = LEAST(r.min_c, EXCLUDED.min_c),
        max_c = GREATEST(r.max_c, EXCLUDED.max_c),
        n_h = r.n_h + EXCLUDED.n_h,
        sum_h = CASE WHEN r.sum_h IS NULL THEN EXCLUDED.sum_h
                     WHEN EXCLUDED.sum_h IS NULL THEN r.sum_h
                     ELSE r.sum_h + EXCLUDED.sum_h END,
        min_h = LEAST(r.min_h, EXCLUDED.min_h),
        max_h = GREATEST(r.max_h, EXCLUDED.max_h),
        n_p = r.n_p + EXCLUDED.n_p,
        sum_p = CASE WHEN r.sum_p IS NULL THEN EXCLUDED.sum_p
                     WHEN EXCLUDED.sum_p IS NULL THEN r.sum_p
                     ELSE r.sum_p + EXCLUDED.sum_p END,
        min_p = LEAST(r.min_p, EXCLUDED.min_p),
        max_p = GREATEST(r.max_p, EXCLUDED.max_p),
        first_ts = LEAST(r.first_ts, EXCLUDED.first_ts),
        last_ts = GREATEST(r.last_ts, EXCLUDED.last_ts)"""

# Run with the driver's own placeholders: %(name)b sends each array in PostgreSQL's binary
# format, which spares psycopg the per-element quoting of the text format (about a third of
# the batch's Python time).
_WRITE_READINGS = """
WITH batch AS (
    SELECT * FROM unnest(
        CAST(%(node)b AS text[]), CAST(%(sensor)b AS text[]), CAST(%(seq)b AS bigint[]),
        CAST(%(kind)b AS text[]), CAST(%(ts)b AS timestamptz[]),
        CAST(%(temperature_c)b AS float8[]), CAST(%(humidity_pct)b AS float8[]),
        CAST(%(time_uncertain)b AS boolean[]), CAST(%(pressure_hpa)b AS float8[])
    ) WITH ORDINALITY
      AS b(node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain,
           pressure_hpa, ord)
),
reach AS MATERIALIZED (
    -- The stored sequence ranges (one per node and partition) that reach up to this batch's
    -- smallest seq of their node. Readings that arrive in order meet none.
    SELECT k.node, k.lo, k.hi, k.min_seq, k.max_seq
      FROM (SELECT node, min(seq) AS seq FROM batch GROUP BY node) AS f
      JOIN node_seq_ranges AS k ON k.node = f.node AND k.max_seq >= f.seq
),
held AS MATERIALIZED (
    -- Readings whose seq lies in another partition's range (another day): their key may be
    -- stored there. They are held back: Store looks them up and writes the new ones with
    -- trusted = true. One in the reading's own partition is the arbiter's to find: that
    -- partition's unique key. Looking them up here would plan every partition of readings
    -- for every batch.
    SELECT DISTINCT b.ord
      FROM batch AS b
      JOIN reach AS k
        ON k.node = b.node AND b.seq BETWEEN k.min_seq AND k.max_seq
       AND NOT (b.ts >= k.lo AND b.ts < k.hi)
     WHERE NOT %(trusted)s
),
fresh AS (
    -- One reading per key (the first), none of those held back.
    SELECT DISTINCT ON (b.node, b.sensor, b.seq) b.*
      FROM batch AS b
     WHERE b.ord NOT IN (SELECT ord FROM held)
     ORDER BY b.node, b.sensor, b.seq, b.ord
),
ins AS (
    INSERT INTO readings
        (node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain,
         pressure_hpa)
    SELECT node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain,
           pressure_hpa
      FROM fresh
    ON CONFLICT DO NOTHING
    RETURNING node, sensor, seq, kind, ts, temperature_c, humidity_pct, pressure_hpa
),
ranges AS (
    -- Each inserted row's partition: a UTC day, or the one made from the table as it was
    -- before migration 0006 (legacy_to, NULL when there was none).
    INSERT INTO node_seq_ranges AS k (node, lo, hi, min_seq, max_seq)
    SELECT node, lo, hi, min(seq), max(seq)
      FROM (SELECT i.node, i.seq,
                   CASE WHEN i.ts < l.legacy_to THEN '-infinity'
                        ELSE date_trunc('day', i.ts, 'UTC') END AS lo,
                   CASE WHEN i.ts < l.legacy_to THEN l.legacy_to
                        ELSE date_trunc('day', i.ts, 'UTC') + interval '1 day' END AS hi
              FROM ins AS i
              LEFT JOIN (SELECT legacy_to FROM data_retention WHERE level = 'raw') AS l
                ON true) AS p
     GROUP BY node, lo, hi
     ORDER BY node, lo
    ON CONFLICT ON CONSTRAINT node_seq_ranges_pkey DO UPDATE SET
        min_seq = LEAST(k.min_seq, EXCLUDED.min_seq),
        max_seq = GREATEST(k.max_seq, EXCLUDED.max_seq)
    WHERE EXCLUDED.min_seq < k.min_seq OR EXCLUDED.max_seq > k.max_seq
    RETURNING 1
),
minutes AS (
    SELECT node, sensor, date_trunc('minute', ts) AS minute, max(kind) AS kind,
           count(*) AS n, sum(temperature_c) AS sum_c, min(temperature_c) AS min_c,
           max(temperature_c) AS max_c, count(humidity_pct) AS n_h, sum(humidity_pct) AS sum_h,
           min(humidity_pct) AS min_h, max(humidity_pct) AS max_h,
           count(pressure_hpa) AS n_p, sum(pressure_hpa) AS sum_p, min(pressure_hpa) AS min_p,
           max(pressure_hpa) AS max_p, min(ts) AS first_ts, max(ts) AS last_ts
      FROM ins
     GROUP BY node, sensor, date_trunc('minute', ts)
),
rollup AS (
    INSERT INTO readings_minute AS r
        (node, sensor, minute, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
         n_p, sum_p, min_p, max_p, first_ts, last_ts)
    SELECT node, sensor, minute, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
           n_p, sum_p, min_p, max_p, first_ts, last_ts
      FROM minutes
     ORDER BY node, sensor, minute
    ON CONFLICT ON CONSTRAINT readings_minute_pkey DO UPDATE SET
{merge}
    RETURNING 1
),
rollup10 AS (
    INSERT INTO readings_10min AS r
        (node, sensor, bucket, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
         n_p, sum_p, min_p, max_p, first_ts, last_ts)
    SELECT node, sensor,
           date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
           max(kind), sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h),
           min(min_h), max(max_h), sum(n_p), sum(sum_p), min(min_p), max(max_p),
           min(first_ts), max(last_ts)
      FROM minutes
     GROUP BY node, sensor, bucket
     ORDER BY node, sensor, bucket
    ON CONFLICT ON CONSTRAINT readings_10min_pkey DO UPDATE SET
{merge}
    RETURNING 1
),
latest AS (
    INSERT INTO sensors AS s
        (node, sensor, kind, last_ts, last_seq, last_temperature_c, last_humidity_pct,
         last_pressure_hpa)
    SELECT DISTINCT ON (node, sensor)
           node, sensor, kind, ts, seq, temperature_c, humidity_pct, pressure_hpa
      FROM ins
     ORDER BY node, sensor, ts DESC, seq DESC
    ON CONFLICT ON CONSTRAINT sensors_pkey DO UPDATE SET
        kind = EXCLUDED.kind,
        last_ts = EXCLUDED.last_ts,
        last_seq = EXCLUDED.last_seq,
        last_temperature_c = EXCLUDED.last_temperature_c,
        last_humidity_pct = EXCLUDED.last_humidity_pct,
        last_pressure_hpa = EXCLUDED.last_pressure_hpa
    WHERE (EXCLUDED.last_ts, EXCLUDED.last_seq) > (s.last_ts, s.last_seq)
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins), (SELECT array_agg(ord) FROM held)
""".replace("{merge}", _MERGE_AGGREGATES)

# The same statement with a plain INSERT: a batch none of whose keys is stored yet (every batch
# but a redelivered one) spares PostgreSQL the speculative insertion ON CONFLICT costs per row
# (about 2.4 us of its 21 us per reading, `python -m bench.statement`). A stored key makes it
# fail on the partition's unique key and change nothing; the batch then runs _WRITE_READINGS.
_WRITE_NEW_READINGS = _WRITE_READINGS.replace("    ON CONFLICT DO NOTHING\n", "", 1)
if _WRITE_NEW_READINGS == _WRITE_READINGS:  # pragma: no cover - the statement changed shape
    raise RuntimeError("_WRITE_READINGS has no ON CONFLICT DO NOTHING of its readings insert")

# Of the readings held back (``ord``: 1-based position among them), those whose key is stored
# in the other partition whose sequence range holds it (the run time prunes the rest).
_STORED_ELSEWHERE = """
SELECT DISTINCT b.ord
  FROM unnest(
        CAST(%(node)b AS text[]), CAST(%(sensor)b AS text[]), CAST(%(seq)b AS bigint[]),
        CAST(%(ts)b AS timestamptz[])
  ) WITH ORDINALITY AS b(node, sensor, seq, ts, ord)
  JOIN node_seq_ranges AS k
    ON k.node = b.node AND b.seq BETWEEN k.min_seq AND k.max_seq
   AND NOT (b.ts >= k.lo AND b.ts < k.hi)
 WHERE EXISTS (SELECT FROM readings AS r
                WHERE r.node = b.node AND r.sensor = b.sensor AND r.seq = b.seq
                  AND r.ts >= k.lo AND r.ts < k.hi)
"""

# The readings sent (``ord``: 1-based position among them) whose key is stored with other
# content. Run after the insert, in the same transaction and with a new snapshot, so it sees the
# rows this batch inserted (a key that two rows of the batch share is compared with the row that
# won) and rows another consumer committed meanwhile; received_at is not content.
_FIND_CONFLICTS = """
SELECT DISTINCT ON (b.ord) b.ord, r.kind, r.ts, r.temperature_c, r.humidity_pct,
       r.time_uncertain, r.pressure_hpa
  FROM unnest(
        CAST(%(node)b AS text[]), CAST(%(sensor)b AS text[]), CAST(%(seq)b AS bigint[]),
        CAST(%(kind)b AS text[]), CAST(%(ts)b AS timestamptz[]),
        CAST(%(temperature_c)b AS float8[]), CAST(%(humidity_pct)b AS float8[]),
        CAST(%(time_uncertain)b AS boolean[]), CAST(%(pressure_hpa)b AS float8[])
  ) WITH ORDINALITY
    AS b(node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain,
         pressure_hpa, ord)
  JOIN node_seq_ranges AS k ON k.node = b.node AND b.seq BETWEEN k.min_seq AND k.max_seq
  JOIN readings AS r
    ON r.node = b.node AND r.sensor = b.sensor AND r.seq = b.seq
   AND r.ts >= k.lo AND r.ts < k.hi
 WHERE (r.kind, r.ts, r.temperature_c, r.humidity_pct, r.time_uncertain, r.pressure_hpa)
       IS DISTINCT FROM
       (b.kind, b.ts, b.temperature_c, b.humidity_pct, b.time_uncertain, b.pressure_hpa)
 ORDER BY b.ord, r.ts
"""

# The WHERE of DO UPDATE is the session rule (Sparkplug's bdSeq idea): `session` names one MQTT
# connection, carried by its statuses and its Last Will. An `offline` applies only to the
# connection it belongs to (or to a row of an agent that sends no session), so the Last Will
# of an earlier connection, which RabbitMQ publishes when the new connection takes the client
# id over, or which another consumer replica commits late, never marks a reconnected node
# offline. An `online` never undoes its own connection's `offline` (a late heartbeat). Statuses
# without a session apply as they arrive. A status that does not apply changes nothing, not
# even last_seen: it is older news than the stored row.
_WRITE_STATUSES = text(
    """
INSERT INTO nodes AS n
    (node, state, state_since, last_seen, reported_at, agent_version, uptime_s, outbox_depth,
     dropped, read_errors, session)
SELECT node, state, now(), now(), reported_at, agent_version, uptime_s, outbox_depth, dropped,
       CAST(read_errors AS jsonb), session
  FROM unnest(
        CAST(:node AS text[]), CAST(:state AS text[]), CAST(:reported_at AS timestamptz[]),
        CAST(:agent_version AS text[]), CAST(:uptime_s AS float8[]),
        CAST(:outbox_depth AS bigint[]), CAST(:dropped AS bigint[]),
        CAST(:read_errors AS text[]), CAST(:session AS text[])
  ) AS u(node, state, reported_at, agent_version, uptime_s, outbox_depth, dropped, read_errors,
         session)
 ORDER BY node
ON CONFLICT ON CONSTRAINT nodes_pkey DO UPDATE SET
    state_since = CASE WHEN n.state = EXCLUDED.state THEN n.state_since ELSE now() END,
    state = EXCLUDED.state,
    last_seen = now(),
    reported_at = COALESCE(EXCLUDED.reported_at, n.reported_at),
    agent_version = COALESCE(EXCLUDED.agent_version, n.agent_version),
    uptime_s = COALESCE(EXCLUDED.uptime_s, n.uptime_s),
    outbox_depth = COALESCE(EXCLUDED.outbox_depth, n.outbox_depth),
    dropped = COALESCE(EXCLUDED.dropped, n.dropped),
    read_errors = COALESCE(EXCLUDED.read_errors, n.read_errors),
    session = EXCLUDED.session
WHERE EXCLUDED.session IS NULL
   OR CASE EXCLUDED.state
          WHEN 'offline' THEN n.session IS NULL OR n.session = EXCLUDED.session
          ELSE n.state <> 'offline' OR n.session IS DISTINCT FROM EXCLUDED.session
      END
"""
)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one committed batch did.

    ``refused`` holds readings that were not written and must be dead-lettered by the caller,
    each as (index into ``readings``, reason): rows the database itself would not take (a
    constraint the decoder does not know about), and readings whose (node, sensor, seq) is
    stored with different content (a reused sequence number; ``conflicts`` counts those). A
    true duplicate (same content) is counted in ``duplicates`` and is not refused.

    ``refused_statuses`` holds statuses the database would not take, as (index into
    ``statuses``, reason); ``statuses`` counts the others, applied or, by the session rule,
    found older than the stored row.
    """

    inserted: int
    duplicates: int
    statuses: int
    refused: tuple[tuple[int, str], ...] = ()
    refused_statuses: tuple[tuple[int, str], ...] = ()
    conflicts: int = 0


class Store:
    """Writes decoded batches through one SQLAlchemy engine (psycopg 3, Core only).

    Each thread that writes keeps one connection checked out between its batches (a checkout
    pings the database, a round trip per batch) and runs it in autocommit: a batch's readings
    are one statement, which PostgreSQL commits atomically on its own, so the common batch
    costs one round trip instead of four (ping, BEGIN, the statement, COMMIT). Node statuses
    are a second statement. A batch is acknowledged only after both committed; a crash
    between them means redelivery, where the readings are duplicates and the statuses apply
    again (the session rule makes that harmless). The rare paths that need savepoints (a
    batch the database refuses, split row by row) run in an explicit transaction. Threads may
    share a store (the writer's workers do): each has its own connection.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        self._held: set[Connection] = set()
        self._days: _StoredDays | None = None

    def close(self) -> None:
        """Return every held connection to the engine's pool; call it when no thread writes."""
        with self._lock:
            held, self._held = self._held, set()
        for conn in held:
            with contextlib.suppress(DBAPIError):
                conn.close()

    def _release(self, conn: Connection) -> None:
        """Give up this thread's connection (the next write checks out a new one)."""
        self._local.conn = None
        with self._lock:
            self._held.discard(conn)
        with contextlib.suppress(DBAPIError):
            conn.close()

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.invalidated):
            self._release(conn)
            conn = None
        if conn is None:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._local.conn = conn
            with self._lock:
                self._held.add(conn)
        return conn

    def write(
        self, readings: Sequence[Reading], statuses: Sequence[NodeStatus] = ()
    ) -> BatchResult:
        """Insert ``readings`` and apply ``statuses``; return when both have committed.

        If the database refuses the readings or the statuses for their data (not for being
        unreachable), the refused part is retried one row (readings) or one node (statuses)
        at a time in savepoints, so one bad row cannot hold back the others; the refused ones
        are reported by index. Readings whose key is stored with different content are
        reported as refused too (see :class:`BatchResult`).

        Raises:
            sqlalchemy.exc.OperationalError (and other DBAPI errors): the database is
                unreachable, failed, or a statement ran into the engine's statement or lock
                timeout; the caller retries the batch (what committed before the error makes
                the retry's readings duplicates, and statuses apply idempotently).
        """
        conn = self._connection()
        try:
            for attempt in (1, 2):
                outside = self._outside_stored_days(conn, readings)
                batch, index = _without(readings, outside)
                refused: list[tuple[int, str]] = []
                try:
                    # The common case: one statement, committed on its own, no savepoints.
                    with conn.begin():
                        inserted, conflicts = self._insert_batch(conn, batch)
                except (DataError, IntegrityError) as exc:
                    if attempt == 1 and _no_partition(exc):
                        # Partitions dropped or not yet made since this store last looked.
                        self._maintain(conn)
                        continue
                    with self._transaction(conn):
                        inserted, refused, conflicts = self._insert_one_by_one(conn, batch)
                break
            if index is not None:
                refused = outside + [(index[i], reason) for i, reason in refused]
                conflicts = [(index[i], reason) for i, reason in conflicts]
            refused_statuses: list[tuple[int, str]] = []
            if statuses:
                merged = _merged(statuses)
                try:
                    with conn.begin():
                        self._apply_statuses(conn, merged)
                except (DataError, IntegrityError):
                    with self._transaction(conn):
                        refused_statuses = self._apply_statuses_split(conn, merged)
        except DBAPIError:
            # Unreachable, timed out, or cancelled: the next attempt starts on a connection
            # the pool has checked (pinged), not on this one.
            self._release(conn)
            raise
        return _result(
            readings=len(readings),
            inserted=inserted,
            refused=refused,
            conflicts=conflicts,
            statuses=len(statuses),
            refused_statuses=refused_statuses,
        )

    def _stored_days(self, conn: Connection, *, fresh: bool = False) -> _StoredDays:
        """What raw readings the partitions hold (data_retention), read at most once a minute."""
        days = self._days
        now = time.monotonic()
        if fresh or days is None or now - days.read_at > _STORED_DAYS_TTL_S:
            with conn.begin():
                row = conn.exec_driver_sql(_READ_STORED_DAYS).one_or_none()
            if row is None:
                days = _StoredDays(None, None, None, now)
            else:
                days = _StoredDays(row[0], row[1], row[2], now)
            self._days = days
        return days

    def _maintain(self, conn: Connection) -> _StoredDays:
        """Make the partitions now (maintenance may be late, or ran in another consumer) and
        read the days again. If that fails, the readings outside are refused, never held."""
        try:
            with conn.begin():
                conn.exec_driver_sql("SELECT count(*) FROM maintain_partitions()").all()
        except (DataError, IntegrityError, ProgrammingError) as exc:
            log.warning("maintain_partitions() failed: %s", _reason(exc))
        return self._stored_days(conn, fresh=True)

    def _outside_stored_days(
        self, conn: Connection, readings: Sequence[Reading]
    ) -> list[tuple[int, str]]:
        """Readings no partition would take, as refusals: older than the raw retention, or
        (after maintain_partitions() ran once more) past the partitions created ahead."""
        if not readings:
            return []
        stamps = [r[4] for r in readings]  # Reading.ts
        days = self._stored_days(conn)
        if days.holds(min(stamps)) and days.holds(max(stamps)):
            return []
        if days.hi is not None and max(stamps) >= days.hi:
            days = self._maintain(conn)
        outside = [(i, days.reason(ts)) for i, ts in enumerate(stamps) if not days.holds(ts)]
        if outside:
            log.warning(
                "readings outside the stored days refused=%d first=%s", len(outside), outside[0][1]
            )
        return outside

    @contextlib.contextmanager
    def _transaction(self, conn: Connection) -> Iterator[None]:
        """A real transaction on the autocommit connection, for the savepoint paths."""
        conn.execution_options(isolation_level=conn.default_isolation_level)
        try:
            with conn.begin():
                yield
        finally:
            if not conn.invalidated and not conn.closed:
                conn.execution_options(isolation_level="AUTOCOMMIT")

    def _insert(
        self, conn: Connection, rows: Sequence[Reading], *, optimistic: bool = False
    ) -> int:
        """Insert ``rows`` (sorted by key); the number inserted.

        ``optimistic`` (only on the autocommit connection, where a failed statement leaves no
        transaction behind) tries the plain INSERT first (_WRITE_NEW_READINGS).
        """
        if not rows:
            return 0
        params = _columns(rows, trusted=False)
        if optimistic:
            try:
                inserted, held = conn.exec_driver_sql(_WRITE_NEW_READINGS, params).one()
            except IntegrityError as exc:
                if not isinstance(exc.orig, psycopg.errors.UniqueViolation):
                    raise
                # A key of the batch is stored already (a redelivery): it changed nothing.
                inserted, held = conn.exec_driver_sql(_WRITE_READINGS, params).one()
        else:
            inserted, held = conn.exec_driver_sql(_WRITE_READINGS, params).one()
        if held:
            # Their seq lies in another day's range: store those whose key is not there.
            candidates = [rows[o - 1] for o in sorted(held)]
            params = _columns(candidates)
            elsewhere = {int(o) for (o,) in conn.exec_driver_sql(_STORED_ELSEWHERE, params)}
            new = [r for o, r in enumerate(candidates, 1) if o not in elsewhere]
            if new:
                inserted += conn.exec_driver_sql(
                    _WRITE_READINGS, _columns(new, trusted=True)
                ).one()[0]
        return int(inserted)

    def _insert_batch(
        self, conn: Connection, readings: Sequence[Reading]
    ) -> tuple[int, list[tuple[int, str]]]:
        """Insert all readings in one statement; (rows inserted, reused keys as refusals)."""
        inserted = self._insert(conn, sorted(readings, key=_KEY), optimistic=True)
        if inserted == len(readings):
            return inserted, []  # nothing conflicted: the common path asks nothing more
        return inserted, self._find_conflicts(conn, readings, range(len(readings)))

    def _insert_one_by_one(
        self, conn: Connection, readings: Sequence[Reading]
    ) -> tuple[int, list[tuple[int, str]], list[tuple[int, str]]]:
        """Each reading in its own savepoint; (inserted, refused by the database, conflicts)."""
        inserted = 0
        refused: list[tuple[int, str]] = []
        not_inserted: list[int] = []
        for i in sorted(range(len(readings)), key=lambda i: _KEY(readings[i])):
            try:
                with conn.begin_nested():
                    if self._insert(conn, [readings[i]]):
                        inserted += 1
                    else:
                        not_inserted.append(i)
            except (DataError, IntegrityError) as exc:
                refused.append((i, f"database refused the row: {_reason(exc)}"))
        conflicts = self._find_conflicts(conn, readings, not_inserted) if not_inserted else []
        log.warning(
            "batch split row by row refused=%d conflicts=%d inserted=%d",
            len(refused),
            len(conflicts),
            inserted,
        )
        return inserted, refused, conflicts

    def _find_conflicts(
        self, conn: Connection, readings: Sequence[Reading], indices: Iterable[int]
    ) -> list[tuple[int, str]]:
        """The readings among ``indices`` whose key is stored with other content, as refusals.

        One query, in the batch's transaction, after the insert: it sees the rows this batch
        inserted, so two readings of the batch with one key and different content are found
        too (the one that did not win the insert is the conflict).
        """
        chosen = list(indices)
        params = _columns([readings[i] for i in chosen])
        found: list[tuple[int, str]] = []
        for (
            ord_,
            kind,
            ts,
            temperature_c,
            humidity_pct,
            time_uncertain,
            pressure_hpa,
        ) in conn.exec_driver_sql(_FIND_CONFLICTS, params):
            i = chosen[ord_ - 1]
            new = readings[i]
            stored = new._replace(
                kind=kind,
                ts=ts,
                temperature_c=temperature_c,
                humidity_pct=humidity_pct,
                time_uncertain=time_uncertain,
                pressure_hpa=pressure_hpa,
            )
            found.append((i, _conflict_reason(new, stored)))
        if found:
            log.warning(
                "sequence numbers reused with different content conflicts=%d first=%s",
                len(found),
                found[0][1],
            )
        return found

    def _apply_statuses(self, conn: Connection, rows: Sequence[_NodeRows]) -> None:
        if rows:
            conn.execute(_WRITE_STATUSES, _status_params([merged for merged, _ in rows]))

    def _apply_statuses_split(
        self, conn: Connection, rows: Sequence[_NodeRows]
    ) -> list[tuple[int, str]]:
        """Apply merged statuses one node per savepoint, after the database refused them
        together; return the refused ones as (index into the batch's statuses, reason), every
        index of a node whose merged row was refused."""
        refused: list[tuple[int, str]] = []
        for row in rows:
            try:
                with conn.begin_nested():
                    self._apply_statuses(conn, [row])
            except (DataError, IntegrityError) as exc:
                reason = f"database refused the status: {_reason(exc)}"
                refused.extend((i, reason) for i in row[1])
        if refused:
            log.warning(
                "status batch split node by node refused_statuses=%d reason=%s",
                len(refused),
                refused[0][1],
            )
        return sorted(refused)


_READ_STORED_DAYS = """
SELECT nullif(stored_from, '-infinity'), nullif(stored_to, 'infinity'), keep_days
  FROM data_retention WHERE level = 'raw'
"""

# How long a Store trusts what it read of data_retention: partitions change once a day.
_STORED_DAYS_TTL_S = 60.0


@dataclass(frozen=True, slots=True)
class _StoredDays:
    """The readings partitions cover [lo, hi) (None: unbounded); the raw retention in days."""

    lo: datetime | None
    hi: datetime | None
    keep_days: int | None
    read_at: float

    def holds(self, ts: datetime) -> bool:
        return (self.lo is None or ts >= self.lo) and (self.hi is None or ts < self.hi)

    def reason(self, ts: datetime) -> str:
        if self.lo is not None and ts < self.lo:
            keep = f"{self.keep_days} days" if self.keep_days else "for ever"
            return (
                f"ts={_format_ts(ts)} is older than the readings the database keeps (from "
                f"{_format_ts(self.lo)}; raw retention {keep}): not stored"
            )
        shown = "nowhere" if self.hi is None else _format_ts(self.hi)
        return (
            f"ts={_format_ts(ts)} is past the partitions the database has (up to {shown}) "
            "even after maintain_partitions(): not stored"
        )


def _columns(rows: Sequence[Reading], **extra: object) -> dict[str, Any]:
    """The statements' parameters: one array per field (a named tuple's columns, transposed
    at C speed), and ``extra``."""
    columns = zip(*rows, strict=True)
    params: dict[str, Any] = {
        name: list(col) for name, col in zip(Reading._fields, columns, strict=True)
    }
    params.update(extra)
    return params


def _without(
    readings: Sequence[Reading], refused: Sequence[tuple[int, str]]
) -> tuple[Sequence[Reading], list[int] | None]:
    """The readings not refused, and their indices in ``readings`` (None: all of them)."""
    if not refused:
        return readings, None
    gone = {i for i, _ in refused}
    index = [i for i in range(len(readings)) if i not in gone]
    return [readings[i] for i in index], index


# A node's merged status and the indices (into the batch's statuses) it was merged from.
_NodeRows = tuple[NodeStatus, list[int]]


def _merged(statuses: Sequence[NodeStatus]) -> list[_NodeRows]:
    """One row per node, in node order (every upsert visits its keys in sorted order)."""
    merged: dict[str, NodeStatus] = {}
    indices: dict[str, list[int]] = {}
    for i, status in enumerate(statuses):
        merged[status.node] = _merge(merged.get(status.node), status)
        indices.setdefault(status.node, []).append(i)
    return [(merged[node], indices[node]) for node in sorted(merged)]


def _status_params(rows: Sequence[NodeStatus]) -> dict[str, list[Any]]:
    return {
        "node": [s.node for s in rows],
        "state": [s.state for s in rows],
        "reported_at": [s.ts for s in rows],
        "agent_version": [s.agent_version for s in rows],
        "uptime_s": [s.uptime_s for s in rows],
        "outbox_depth": [s.outbox_depth for s in rows],
        "dropped": [s.dropped for s in rows],
        "read_errors": [None if s.read_errors is None else json.dumps(s.read_errors) for s in rows],
        "session": [s.session for s in rows],
    }


def _applies(stored: NodeStatus, new: NodeStatus) -> bool:
    """The session rule of ``_WRITE_STATUSES``, for statuses of one node within a batch."""
    if new.session is None:
        return True
    if new.state == "offline":
        return stored.session is None or stored.session == new.session
    return stored.state != "offline" or stored.session != new.session


def _merge(old: NodeStatus | None, new: NodeStatus) -> NodeStatus:
    """Fold ``new`` into the batch's earlier status of its node, as the database would.

    A later message of the batch wins, and its missing counters are taken from the earlier
    ones (a Last Will carries none), unless the session rule says it is older news: then the
    earlier status stays as it was. One consumer meets that too: when an agent reconnects,
    RabbitMQ publishes the old connection's Last Will as the new connection takes the client
    id over, after the new connection's ``online`` may already be queued.
    """
    if old is None:
        return new
    if not _applies(old, new):
        return old
    return NodeStatus(
        node=new.node,
        state=new.state,
        ts=new.ts if new.ts is not None else old.ts,
        agent_version=new.agent_version if new.agent_version is not None else old.agent_version,
        uptime_s=new.uptime_s if new.uptime_s is not None else old.uptime_s,
        outbox_depth=new.outbox_depth if new.outbox_depth is not None else old.outbox_depth,
        dropped=new.dropped if new.dropped is not None else old.dropped,
        read_errors=new.read_errors if new.read_errors is not None else old.read_errors,
        session=new.session,
    )


def _result(
    *,
    readings: int,
    inserted: int,
    refused: list[tuple[int, str]],
    conflicts: list[tuple[int, str]],
    statuses: int,
    refused_statuses: list[tuple[int, str]],
) -> BatchResult:
    return BatchResult(
        inserted=inserted,
        duplicates=readings - inserted - len(refused) - len(conflicts),
        statuses=statuses - len(refused_statuses),
        refused=tuple(sorted(refused + conflicts)),
        refused_statuses=tuple(refused_statuses),
        conflicts=len(conflicts),
    )


def _no_partition(exc: DBAPIError) -> bool:
    """The row's time has no partition (PostgreSQL says so with a check_violation)."""
    return isinstance(exc.orig, psycopg.errors.CheckViolation) and "no partition" in str(exc.orig)


def _reason(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)


def _format_ts(ts: datetime) -> str:
    naive = ts.astimezone(UTC).replace(tzinfo=None)
    spec = "milliseconds" if naive.microsecond % 1000 == 0 else "microseconds"
    return naive.isoformat(timespec=spec) + "Z"


def _format_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _format_ts(value)
    return str(value)


def _conflict_reason(new: Reading, stored: Reading) -> str:
    """Names the key and both versions: ts and temperature_c always, the rest where they differ."""
    fields = ["ts", "temperature_c"] + [
        name
        for name in ("humidity_pct", "pressure_hpa", "kind", "time_uncertain")
        if getattr(stored, name) != getattr(new, name)
    ]

    def shown(reading: Reading) -> str:
        return " ".join(f"{name}={_format_value(getattr(reading, name))}" for name in fields)

    return (
        "sequence number reused with different content: "
        f"node={new.node} sensor={new.sensor} seq={new.seq}; "
        f"stored {shown(stored)}; this message {shown(new)}"
    )
