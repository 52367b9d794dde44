"""Writing batches to PostgreSQL: one transaction per batch, idempotent on the natural key.

One statement inserts the batch with ``ON CONFLICT DO NOTHING`` and, from the rows that really
inserted (``RETURNING``), updates the per-minute and ten-minute rollups and the latest reading
per sensor. A redelivered batch therefore changes nothing twice. Rows are sorted by key before
they are sent, and every upsert visits its keys in sorted order, so concurrent consumers wait
for each other instead of deadlocking on rollup rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DataError, IntegrityError

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
        CAST(%(time_uncertain)b AS boolean[])
    ) AS b(node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain)
),
ins AS (
    INSERT INTO readings
        (node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain)
    SELECT node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain FROM batch
    ON CONFLICT ON CONSTRAINT readings_pkey DO NOTHING
    RETURNING node, sensor, seq, kind, ts, temperature_c, humidity_pct
),
minutes AS (
    SELECT node, sensor, date_trunc('minute', ts) AS minute, max(kind) AS kind,
           count(*) AS n, sum(temperature_c) AS sum_c, min(temperature_c) AS min_c,
           max(temperature_c) AS max_c, count(humidity_pct) AS n_h, sum(humidity_pct) AS sum_h,
           min(humidity_pct) AS min_h, max(humidity_pct) AS max_h, min(ts) AS first_ts,
           max(ts) AS last_ts
      FROM ins
     GROUP BY node, sensor, date_trunc('minute', ts)
),
rollup AS (
    INSERT INTO readings_minute AS r
        (node, sensor, minute, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
         first_ts, last_ts)
    SELECT node, sensor, minute, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
           first_ts, last_ts
      FROM minutes
     ORDER BY node, sensor, minute
    ON CONFLICT ON CONSTRAINT readings_minute_pkey DO UPDATE SET
{merge}
    RETURNING 1
),
rollup10 AS (
    INSERT INTO readings_10min AS r
        (node, sensor, bucket, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
         first_ts, last_ts)
    SELECT node, sensor,
           date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
           max(kind), sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h),
           min(min_h), max(max_h), min(first_ts), max(last_ts)
      FROM minutes
     GROUP BY node, sensor, bucket
     ORDER BY node, sensor, bucket
    ON CONFLICT ON CONSTRAINT readings_10min_pkey DO UPDATE SET
{merge}
    RETURNING 1
),
latest AS (
    INSERT INTO sensors AS s
        (node, sensor, kind, last_ts, last_seq, last_temperature_c, last_humidity_pct)
    SELECT DISTINCT ON (node, sensor)
           node, sensor, kind, ts, seq, temperature_c, humidity_pct
      FROM ins
     ORDER BY node, sensor, ts DESC, seq DESC
    ON CONFLICT ON CONSTRAINT sensors_pkey DO UPDATE SET
        kind = EXCLUDED.kind,
        last_ts = EXCLUDED.last_ts,
        last_seq = EXCLUDED.last_seq,
        last_temperature_c = EXCLUDED.last_temperature_c,
        last_humidity_pct = EXCLUDED.last_humidity_pct
    WHERE (EXCLUDED.last_ts, EXCLUDED.last_seq) > (s.last_ts, s.last_seq)
    RETURNING 1
)
SELECT count(*) FROM ins
""".replace("{merge}", _MERGE_AGGREGATES)

_WRITE_STATUSES = text(
    """
INSERT INTO nodes AS n
    (node, state, state_since, last_seen, reported_at, agent_version, uptime_s, outbox_depth,
     dropped, read_errors)
SELECT node, state, now(), now(), reported_at, agent_version, uptime_s, outbox_depth, dropped,
       CAST(read_errors AS jsonb)
  FROM unnest(
        CAST(:node AS text[]), CAST(:state AS text[]), CAST(:reported_at AS timestamptz[]),
        CAST(:agent_version AS text[]), CAST(:uptime_s AS float8[]),
        CAST(:outbox_depth AS bigint[]), CAST(:dropped AS bigint[]),
        CAST(:read_errors AS text[])
  ) AS u(node, state, reported_at, agent_version, uptime_s, outbox_depth, dropped, read_errors)
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
    read_errors = COALESCE(EXCLUDED.read_errors, n.read_errors)
"""
)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one committed batch did.

    ``refused`` holds readings the database itself would not take (a constraint the decoder
    does not know about), each with the database's reason; they were not written and must be
    dead-lettered by the caller.
    """

    inserted: int
    duplicates: int
    statuses: int
    refused: tuple[tuple[int, str], ...] = ()


class Store:
    """Writes decoded batches through one SQLAlchemy engine (psycopg 3, Core only)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def write(
        self, readings: Sequence[Reading], statuses: Sequence[NodeStatus] = ()
    ) -> BatchResult:
        """Insert ``readings`` and apply ``statuses`` in one transaction.

        Returns when the transaction has committed. If the database refuses the batch for its
        data (not for being unreachable), the rows are retried one by one in savepoints so
        one bad row cannot hold back the others; the refused ones are reported by index.

        Raises:
            sqlalchemy.exc.OperationalError (and other DBAPI errors): the database is
                unreachable or failed; nothing was committed, the caller retries the batch.
        """
        try:
            # The common case: one statement for the whole batch, no savepoint round trips.
            with self._engine.begin() as conn:
                inserted = self._insert(conn, sorted(readings, key=_KEY))
                applied = self._apply_statuses(conn, statuses)
            return BatchResult(
                inserted=inserted, duplicates=len(readings) - inserted, statuses=applied
            )
        except (DataError, IntegrityError):
            if not readings:
                raise
        # The batch rolled back as a whole; again, with each row in its own savepoint.
        order = sorted(range(len(readings)), key=lambda i: _KEY(readings[i]))
        with self._engine.begin() as conn:
            inserted, refused = self._insert_one_by_one(conn, readings, order)
            applied = self._apply_statuses(conn, statuses)
        return BatchResult(
            inserted=inserted,
            duplicates=len(readings) - len(refused) - inserted,
            statuses=applied,
            refused=tuple(refused),
        )

    def _insert(self, conn: Connection, rows: Sequence[Reading]) -> int:
        if not rows:
            return 0
        # Reading is a named tuple: zip transposes the rows into columns at C speed.
        columns = zip(*rows, strict=True)
        params = {name: list(col) for name, col in zip(Reading._fields, columns, strict=True)}
        return int(conn.exec_driver_sql(_WRITE_READINGS, params).scalar_one())

    def _insert_one_by_one(
        self, conn: Connection, readings: Sequence[Reading], order: Sequence[int]
    ) -> tuple[int, list[tuple[int, str]]]:
        inserted = 0
        refused: list[tuple[int, str]] = []
        for i in order:
            try:
                with conn.begin_nested():
                    inserted += self._insert(conn, [readings[i]])
            except (DataError, IntegrityError) as exc:
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                refused.append((i, f"database refused the row: {reason}"))
        log.warning("batch split row by row refused=%d inserted=%d", len(refused), inserted)
        return inserted, refused

    def _apply_statuses(self, conn: Connection, statuses: Sequence[NodeStatus]) -> int:
        if not statuses:
            return 0
        # One row per node: a later message of the batch wins, and its missing counters are
        # taken from the earlier ones (an Last Will carries none).
        merged: dict[str, NodeStatus] = {}
        for status in statuses:
            merged[status.node] = _merge(merged.get(status.node), status)
        rows = [merged[node] for node in sorted(merged)]
        conn.execute(
            _WRITE_STATUSES,
            {
                "node": [s.node for s in rows],
                "state": [s.state for s in rows],
                "reported_at": [s.ts for s in rows],
                "agent_version": [s.agent_version for s in rows],
                "uptime_s": [s.uptime_s for s in rows],
                "outbox_depth": [s.outbox_depth for s in rows],
                "dropped": [s.dropped for s in rows],
                "read_errors": [
                    None if s.read_errors is None else json.dumps(s.read_errors) for s in rows
                ],
            },
        )
        return len(statuses)


def _merge(old: NodeStatus | None, new: NodeStatus) -> NodeStatus:
    if old is None:
        return new
    return NodeStatus(
        node=new.node,
        state=new.state,
        ts=new.ts if new.ts is not None else old.ts,
        agent_version=new.agent_version if new.agent_version is not None else old.agent_version,
        uptime_s=new.uptime_s if new.uptime_s is not None else old.uptime_s,
        outbox_depth=new.outbox_depth if new.outbox_depth is not None else old.outbox_depth,
        dropped=new.dropped if new.dropped is not None else old.dropped,
        read_errors=new.read_errors if new.read_errors is not None else old.read_errors,
    )
