"""Summary at scale: `sensor_summary_last_hour` over 50 million readings from 1,000 sensors.

    .venv/bin/python -m bench.summary [--sensors 1000] [--readings 50000000] [--queries 200]

Starts a private PostgreSQL (the test harness), applies the pipeline's migrations, and loads
the readings with COPY: 1,000 sensors (100 nodes x 10, every fourth a DHT22 with humidity),
one reading every 10 s each, in arrival (time) order, ending now. The loader drops the
readings indexes first and rebuilds them from their own definitions afterwards, then builds
the per-minute rollup from the rows with the same aggregates the consumer keeps, and the
latest reading per sensor. The minutes between the end of the load and the measurement are
then written through the pipeline's own `Store.write`, as the consumer would have written
them, and a writer keeps adding one reading per sensor every 10 s while the queries run.

It then times, on the same data, with the same connection settings:

  ours        SELECT * FROM sensor_summary_last_hour   (rollup minutes + raw edge minutes)
  baseline    the plain GROUP BY over raw rows:
              SELECT node, sensor, count(*), avg(..), min(..), max(..) FROM readings
               WHERE ts > now() - interval '1 hour' GROUP BY node, sensor

and checks that both give the same count, min and max for every sensor. Prints p50 and p99
of the time until the client holds every row (binary results, so Python's text parsing is
not what is timed).
Target (issue "Benchmarks"): p50 of ours under 20 ms.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
from sqlalchemy import create_engine

from pipeline.decode import Reading
from pipeline.store import Store
from tests.harness import PostgresServer

INTERVAL_S = 10
SENSORS_PER_NODE = 10

OURS = "SELECT * FROM sensor_summary_last_hour"
PLAIN = """
SELECT node, sensor, count(*) AS readings, avg(temperature_c) AS avg_c,
       min(temperature_c) AS min_c, max(temperature_c) AS max_c,
       avg(humidity_pct) AS avg_humidity_pct, min(humidity_pct) AS min_humidity_pct,
       max(humidity_pct) AS max_humidity_pct, min(ts) AS first_ts, max(ts) AS last_ts
  FROM readings
 WHERE ts > now() - interval '1 hour' AND ts <= now()
 GROUP BY node, sensor
"""

# One row per (step, sensor) for steps [lo, hi): ts in arrival order, a per-node seq that
# never repeats, a slow daily wave plus noise, humidity for every fourth sensor (DHT22).
_GENERATE = """
COPY (
    SELECT 'node-' || lpad((s / {per_node})::text, 3, '0'),
           's' || (s % {per_node}),
           step::bigint * {per_node} + s % {per_node},
           CASE WHEN s % 4 = 3 THEN 'dht22' ELSE 'ds18b20' END,
           ts,
           round((20 + 4 * sin(extract(epoch FROM ts) / 13751.0 + s)
                  + random() - 0.5)::numeric, 3)::float8,
           CASE WHEN s % 4 = 3 THEN round((55 + 10 * sin(extract(epoch FROM ts) / 9000.0)
                  + random())::numeric, 2)::float8 END,
           false,
           ts + interval '150 milliseconds'
      FROM generate_series({lo}, {hi} - 1) AS step,
           LATERAL (SELECT '{t0}'::timestamptz + step * interval '{interval} seconds' AS ts) t,
           generate_series(0, {sensors} - 1) AS s
     ORDER BY step, s
) TO STDOUT
"""

# The columns _GENERATE writes, by name: later migrations add columns (0007: pressure_hpa).
_COPY_INTO = (
    "COPY readings (node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain,"
    " received_at) FROM STDIN"
)

_ROLLUP = """
INSERT INTO readings_minute
    (node, sensor, minute, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
     first_ts, last_ts)
SELECT node, sensor, date_trunc('minute', ts), max(kind), count(*), sum(temperature_c),
       min(temperature_c), max(temperature_c), count(humidity_pct), sum(humidity_pct),
       min(humidity_pct), max(humidity_pct), min(ts), max(ts)
  FROM readings
 GROUP BY node, sensor, date_trunc('minute', ts)
 ORDER BY date_trunc('minute', ts), node, sensor
"""

_ROLLUP_10MIN = """
INSERT INTO readings_10min
    (node, sensor, bucket, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
     first_ts, last_ts)
SELECT node, sensor, date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       max(kind), sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h),
       min(min_h), max(max_h), min(first_ts), max(last_ts)
  FROM readings_minute
 GROUP BY 1, 2, 3
 ORDER BY 3, 1, 2
"""

_LATEST = """
INSERT INTO sensors (node, sensor, kind, first_seen, last_ts, last_seq, last_temperature_c,
                     last_humidity_pct)
SELECT DISTINCT ON (node, sensor) node, sensor, kind, %(t0)s, ts, seq, temperature_c,
       humidity_pct
  FROM readings
 ORDER BY node, sensor, ts DESC, seq DESC
"""


def say(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Every index of a table and of its partitions that is not itself a partition of an index
# (dropping an index of a partitioned table drops its partitions' with it): a partitioned
# table's own indexes and each partition's unique key (migration 0006), or a plain table's
# (pg_partition_tree() has no rows for a table that is not partitioned).
_INDEXES = """
SELECT c.relname, pg_get_indexdef(c.oid), con.conname, pg_get_constraintdef(con.oid),
       i.indrelid::regclass::text
  FROM (SELECT %(table)s::regclass AS relid
        UNION SELECT relid FROM pg_partition_tree(%(table)s::regclass)) AS t
  JOIN pg_index AS i ON i.indrelid = t.relid
  JOIN pg_class AS c ON c.oid = i.indexrelid
  LEFT JOIN pg_constraint AS con
    ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u')
 WHERE NOT EXISTS (SELECT FROM pg_inherits AS h WHERE h.inhrelid = i.indexrelid)
 ORDER BY i.indrelid, c.relname
"""

# (index name, its definition, its constraint's name and definition or None, its table)
Index = tuple[str, str, str | None, str | None, str]


def drop_indexes(conn: psycopg.Connection[tuple[object, ...]], table: str) -> list[Index]:
    """Drop the indexes of ``table`` and its partitions; what rebuild_indexes() needs."""
    indexes: list[Index] = [
        (str(n), str(d), None if c is None else str(c), None if cd is None else str(cd), str(t))
        for n, d, c, cd, t in conn.execute(_INDEXES, {"table": table}).fetchall()
    ]
    for name, _, constraint, _, owner in indexes:
        if constraint:
            conn.execute(f"ALTER TABLE {owner} DROP CONSTRAINT {constraint}")
        else:
            conn.execute(f"DROP INDEX {name}")
    return indexes


def rebuild_indexes(
    conn: psycopg.Connection[tuple[object, ...]], indexes: list[Index], *, report: bool = True
) -> float:
    """Create the indexes drop_indexes() dropped, from their own definitions; the seconds it
    took. An index of a partitioned table is defined ON ONLY the parent; made without ONLY it
    is built on every partition too. ``report`` names each index that took a second or more.
    """
    start = time.monotonic()
    for name, definition, constraint, constraint_def, owner in indexes:
        began = time.monotonic()
        if constraint:
            conn.execute(f"ALTER TABLE {owner} ADD CONSTRAINT {constraint} {constraint_def}")
        else:
            conn.execute(definition.replace(" ON ONLY ", " ON ", 1))
        if report and time.monotonic() - began >= 1:
            say(f"index {name}: {time.monotonic() - began:.0f} s")
    return time.monotonic() - start


# Migration 0006: per node and partition of readings, the range of sequence numbers stored
# there, which Store.write consults: rows loaded around it are recorded as it would record
# them.
_SEQ_RANGES = """
INSERT INTO {table} ({keys}, lo, hi, min_seq, max_seq)
SELECT {r_keys}, b.lo, b.hi, min(r.seq), max(r.seq)
  FROM readings AS r
  JOIN partition_bounds('readings') AS b ON b.part::oid = r.tableoid
 GROUP BY {r_keys}, b.lo, b.hi
"""


def seq_ranges(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[str, list[str]] | None:
    """The table of stored sequence ranges (0006) and its key columns besides the bounds;
    None before 0006."""
    row = conn.execute("SELECT to_regclass('node_seq_ranges')").fetchone()
    return None if row is None or row[0] is None else ("node_seq_ranges", ["node"])


def load(url: str, sensors: int, readings: int, end: datetime) -> int:
    """COPY ``readings`` rows into an index-free readings table, then rebuild its indexes."""
    steps = readings // sensors
    t0 = end - timedelta(seconds=INTERVAL_S * steps)
    with psycopg.connect(url, autocommit=True) as admin:
        indexes = drop_indexes(admin, "readings")
    chunk = max(1, 360_000 // sensors)  # about an hour of readings per COPY
    began = time.monotonic()
    with (
        psycopg.connect(url, autocommit=True) as src,
        psycopg.connect(url, autocommit=True) as dst,
    ):
        for lo in range(0, steps, chunk):
            hi = min(steps, lo + chunk)
            sql = _GENERATE.format(
                per_node=SENSORS_PER_NODE,
                sensors=sensors,
                interval=INTERVAL_S,
                lo=lo,
                hi=hi,
                t0=t0.isoformat(),
            )
            with (
                src.cursor().copy(sql) as out,
                dst.cursor().copy(_COPY_INTO) as into,
            ):
                for block in out:
                    into.write(block)
            if lo // chunk % 20 == 0:
                say(f"copied {hi * sensors:,} of {steps * sensors:,} readings")
    copied = steps * sensors
    say(f"COPY: {copied:,} readings in {time.monotonic() - began:.0f} s")
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SET maintenance_work_mem = '1GB'")
        admin.execute("SET work_mem = '1GB'")
        took = rebuild_indexes(admin, indexes)
        say(f"{len(indexes)} indexes rebuilt in {took:.0f} s")
        began = time.monotonic()
        admin.execute(_ROLLUP)
        admin.execute(_ROLLUP_10MIN)
        admin.execute(_LATEST, {"t0": t0})
        if ranges := seq_ranges(admin):
            table, keys = ranges
            admin.execute(
                _SEQ_RANGES.format(
                    table=table, keys=", ".join(keys), r_keys=", ".join(f"r.{k}" for k in keys)
                ).encode()
            )
        say(f"rollup, latest and sequence ranges: {time.monotonic() - began:.0f} s")
        began = time.monotonic()
        admin.execute("VACUUM (ANALYZE) readings, readings_minute, readings_10min, sensors")
        say(f"vacuum analyze: {time.monotonic() - began:.0f} s")
        size = admin.execute(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(relid)))"
            "  FROM pg_partition_tree('readings')"
            " UNION ALL SELECT pg_size_pretty(sum(pg_total_relation_size(relid)))"
            "  FROM pg_partition_tree('readings_minute')"
        ).fetchall()
        say(f"readings {size[0][0]} with indexes, readings_minute {size[1][0]}")
    return copied


class LiveWriter(threading.Thread):
    """Writes what the consumer would: every sensor's readings up to now, through Store."""

    def __init__(self, url: str, sensors: int, steps: int, t0: datetime) -> None:
        super().__init__(daemon=True)
        self.store = Store(create_engine(url.replace("postgresql://", "postgresql+psycopg://")))
        self.sensors, self.step, self.t0 = sensors, steps, t0
        self.stop = threading.Event()
        self.written = 0

    def catch_up(self) -> int:
        now = datetime.now(UTC)
        written = 0
        while self.t0 + timedelta(seconds=INTERVAL_S * self.step) <= now:
            ts = self.t0 + timedelta(seconds=INTERVAL_S * self.step)
            batch = []
            for s in range(self.sensors):
                dht = s % 4 == 3
                batch.append(
                    Reading(
                        f"node-{s // SENSORS_PER_NODE:03d}",
                        f"s{s % SENSORS_PER_NODE}",
                        "dht22" if dht else "ds18b20",
                        self.step * SENSORS_PER_NODE + s % SENSORS_PER_NODE,
                        ts,
                        20.0 + (s % 7) / 10,
                        55.0 if dht else None,
                        False,
                    )
                )
            written += self.store.write(batch).inserted
            self.step += 1
        self.written += written
        return written

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.catch_up()


# $1 to $6 of the function's statement; since 0006 also $7 and $8 (read the raw rows at the
# left and the right end) and $9 (exact): true for the last hour, inside the raw retention.
_BOUNDS = """
SELECT t0, t1, m0, m1, b0, greatest(date_bin('10 minutes', m1, TIMESTAMPTZ '2000-01-01Z'), b0),
       true, true, true
  FROM (SELECT t0, t1, m0, greatest(date_trunc('minute', t1), m0) AS m1,
               date_bin('10 minutes', m0 + interval '9 minutes', TIMESTAMPTZ '2000-01-01Z') AS b0
          FROM (SELECT now() - interval '1 hour' AS t0, now() AS t1,
                       date_trunc('minute', now() - interval '1 hour') + interval '1 minute' AS m0
               ) AS w) AS v
"""


def inner_plan(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """EXPLAIN ANALYZE of the statement sensor_summary() runs, with the last hour's bounds.

    The function plans its statement at run time (EXECUTE), so EXPLAIN of the view only shows
    a function scan; this runs the same text, taken from the function, with the same settings.
    """
    source = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'sensor_summary'").fetchone()
    assert source is not None
    statement = str(source[0]).split("$q$")[1]
    bounds = conn.execute(_BOUNDS).fetchone()
    assert bounds is not None
    for i in range(len(bounds), 0, -1):
        value = bounds[i - 1]
        shown = f"'{value.isoformat()}'::timestamptz" if isinstance(value, datetime) else value
        statement = statement.replace(f"${i}", str(shown))
    with conn.transaction():
        conn.execute("SET LOCAL jit = off")
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {statement}").fetchall()
    return "\n".join(str(r[0]) for r in rows)


def timed(conn: psycopg.Connection[tuple[object, ...]], sql: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        conn.execute(sql, binary=True).fetchall()
        out.append((time.perf_counter() - began) * 1000)
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def compare(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Both queries in one snapshot: same sensors, counts, minima and maxima."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        ours = {(r[0], r[1]): (r[3], r[5], r[6]) for r in conn.execute(OURS).fetchall()}
        plain = {(r[0], r[1]): (r[2], r[4], r[5]) for r in conn.execute(PLAIN).fetchall()}
    if ours != plain:
        diff = sorted(k for k in ours.keys() | plain.keys() if ours.get(k) != plain.get(k))
        raise SystemExit(
            f"summary differs from the plain GROUP BY for {len(diff)} sensors, e.g. {diff[0]}:"
            f" {ours.get(diff[0])} vs {plain.get(diff[0])}"
        )
    return len(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--readings", type=int, default=50_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--plain-queries", type=int, default=20)
    args = parser.parse_args()

    print(f"summary at scale: {args.readings:,} readings, {args.sensors:,} sensors")
    with PostgresServer() as pg:
        _name, url = pg.owned_database("bench")
        end = datetime.now(UTC).replace(microsecond=0)
        copied = load(url, args.sensors, args.readings, end)
        steps = copied // args.sensors
        writer = LiveWriter(url, args.sensors, steps, end - timedelta(seconds=INTERVAL_S * steps))
        began = time.monotonic()
        caught_up = writer.catch_up()
        writer.written = 0
        say(f"Store.write caught up {caught_up:,} readings in {time.monotonic() - began:.1f} s")
        writer.start()
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                sensors_seen = compare(conn)
                say(f"summary equals the plain GROUP BY for all {sensors_seen:,} sensors")
                timed(conn, OURS, 5)  # warm the caches both queries share
                timed(conn, PLAIN, 2)
                ours = timed(conn, OURS, args.queries)
                plain = timed(conn, PLAIN, args.plain_queries)
                plan = inner_plan(conn)
        finally:
            writer.stop.set()
            writer.join()
    say(f"live writer added {writer.written:,} readings while the queries ran")
    print()
    print(
        f"{args.readings:,} readings, {args.sensors:,} sensors, last hour:"
        f" {sensors_seen:,} summary rows"
    )
    print(f"{'query':<52} {'runs':>5} {'p50 ms':>9} {'p99 ms':>9} {'vs plain':>9}")
    p50_plain = statistics.median(plain)
    for name, values in (
        ("ours: sensor_summary_last_hour", ours),
        ("baseline: plain GROUP BY over raw rows", plain),
    ):
        p50 = statistics.median(values)
        print(
            f"{name:<52} {len(values):>5} {p50:>9.1f} {pct(values, 99):>9.1f}"
            f" {p50 / p50_plain:>8.2f}x"
        )
    met = statistics.median(ours) < 20
    print(f"target: p50 of ours < 20 ms: {'met' if met else 'NOT met'}")
    print("\nplan of the statement sensor_summary() runs (EXPLAIN ANALYZE):\n" + plan)


if __name__ == "__main__":
    main()
