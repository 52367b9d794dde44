"""Partitions at scale: the partitioned schema (0006) next to the table it replaced, same run.

    .venv/bin/python -m bench.partitions [--readings 50000000] [--days 30] [--sensors 200]
        [--queries 200] [--repeat 3] [--write-readings 200000] [--drain-readings 200000]

Starts a private PostgreSQL (the test harness) with two databases:

  P   migrated to the latest schema: readings partitioned by UTC day, the rollups by month
      and year, the stored sequence ranges; written by the current code
  U   migrated up to 0005, the unpartitioned schema before 0006; written by the code of
      commit ed85972 (the pipeline package as it was, from `git archive`, on PYTHONPATH)

and loads both with the same readings, generated in the server (INSERT ... SELECT over
generate_series, one statement per UTC day that also fills the per-minute and ten-minute
rollups and, in P, the stored sequence ranges from the rows it inserted; indexes dropped
first and rebuilt from their own definitions afterwards; both databases at once, one
backend each):
--sensors sensors (10 per node, every fourth a DHT22 with humidity), each reading at the
same steps, spread evenly from UTC midnight --days days ago (so --days whole daily
partitions, plus today's) to a few minutes before now. The default, 50,000,000 readings
from 200 sensors over 30 days, is a reading every 10.4 s per sensor. The readings written
afterwards continue each sensor's sequence numbers and times. P's raw retention is set to
--days, so its oldest partition is the first loaded day.

Then it measures, each next to its baseline on U in the same run, as ratios P/U:

  (a) write rate     Store.write of 1,000-reading batches from one thread, in a subprocess
                     running the current code on P and the old code on U (--write-readings
                     per round; rounds interleaved, --repeat, medians)
  (b) drain          `pipeline consume` (bench.drain's runner: a private RabbitMQ configured
                     by gateway/, one replica) of --drain-readings queued readings, the
                     current consumer into P and the old one into U; CPU time per reading
  (c) summary        p50 and p99 of SELECT * FROM sensor_summary_last_hour, --queries each,
                     interleaved, binary results; both databases first give the same count,
                     minimum and maximum per sensor for one window
  (d) retention      maintain_partitions() after lowering the raw retention by a day, as the
                     owner: it drops P's oldest day while a writer (Store.write, current
                     code, its own process) keeps inserting: seconds, rows dropped, and the
                     writer's longest batch during the drop against its median batch. The
                     baseline: DELETE of the same rows from U, then VACUUM, while the old
                     code's writer inserts
  (e) migration      `migrate()` of U to the latest schema (its table attached whole as the
                     legacy partition) while the old code's writer inserts: seconds, and the
                     writer's longest stall

Targets (issue 15.5): the drain rate of P within 10 % of U's (ratio >= 0.90), the summary's
p50 unchanged (taken as within 10 %: ratio <= 1.10), a day's partition dropped in under a
second. The load's timings are printed as it goes; at 50 million readings it writes about
20 GB under /tmp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import psycopg
from psycopg import sql

from bench import drain
from bench.summary import OURS, Index, drop_indexes, pct, rebuild_indexes, say, seq_ranges
from pipeline.decode import Reading
from pipeline.migrate import migrate
from tempmon_contract.wire import reading_payload
from tests.harness import PostgresServer, RabbitBroker
from tests.harness.procs import REPO

OLD_COMMIT = "ed85972"
CURRENT_SRC = REPO / "pipeline" / "src"
SENSORS_PER_NODE = 10
BATCH = 1000
# The readings written after the load (write rate, drain) are one step of every sensor per
# 100 ms of their time: the load ends early enough for all of them to lie in the past.
SPACING_US = 100_000

# One UTC day of readings: generated, inserted, and rolled up from the rows it inserted.
# Values are a function of (step, sensor), so P and U hold the same rows.
_LOAD = """
WITH ins AS (
    INSERT INTO {target}
        (node, sensor, seq, kind, ts, temperature_c, humidity_pct, time_uncertain, received_at)
    SELECT 'node-' || lpad((g.s / {per_node})::text, 3, '0'), 's' || mod(g.s, {per_node}),
           k * {per_node} + mod(g.s, {per_node}),
           CASE WHEN mod(g.s, 4) = 3 THEN 'dht22' ELSE 'ds18b20' END,
           g.ts,
           20 + 4 * sin(k * {interval_s}::float8 / 13751 + g.s)
              + mod(k * 7919 + g.s * 104729, 1000)::float8 / 1000 - 0.5,
           CASE WHEN mod(g.s, 4) = 3 THEN 55 + 10 * sin(k * {interval_s}::float8 / 9000)
              + mod(k * 104729 + g.s * 7919, 1000)::float8 / 1000 END,
           false,
           g.ts + interval '150 milliseconds'
      FROM generate_series({k_lo}::bigint, {k_hi}::bigint - 1) AS k,
           LATERAL (SELECT s, '{t0}'::timestamptz + (k * {interval_us}) * interval '1 microsecond'
                           AS ts
                      FROM generate_series(0, {sensors} - 1) AS s
                    OFFSET 0) AS g  -- not pulled up: the rows come in time order
    RETURNING node, sensor, seq, kind, ts, temperature_c, humidity_pct
),
minutes AS (
    INSERT INTO readings_minute
        (node, sensor, minute, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
         first_ts, last_ts)
    SELECT node, sensor, date_trunc('minute', ts), max(kind), count(*), sum(temperature_c),
           min(temperature_c), max(temperature_c), count(humidity_pct), sum(humidity_pct),
           min(humidity_pct), max(humidity_pct), min(ts), max(ts)
      FROM ins
     GROUP BY node, sensor, date_trunc('minute', ts)
    RETURNING node, sensor, minute, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
              first_ts, last_ts
),
buckets AS (
    INSERT INTO readings_10min
        (node, sensor, bucket, kind, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,
         first_ts, last_ts)
    SELECT node, sensor, date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           max(kind), sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h),
           min(min_h), max(max_h), min(first_ts), max(last_ts)
      FROM minutes
     GROUP BY 1, 2, 3
    RETURNING 1
){extra}
SELECT count(*) FROM ins
"""

# P only: the sequence numbers in this day's partition, per node (or per whatever key the
# table has besides the bounds), as Store.write records them.
_LOAD_RANGES = """,
ranges AS (
    INSERT INTO {table} ({keys}, lo, hi, min_seq, max_seq)
    SELECT {keys}, '{lo}'::timestamptz, '{hi}'::timestamptz, min(seq), max(seq)
      FROM ins
     GROUP BY {keys}
    RETURNING 1
)"""

# The last day: every sensor's newest reading (the last step has one of each).
_LOAD_LATEST = """,
latest AS (
    INSERT INTO sensors (node, sensor, kind, first_seen, last_ts, last_seq, last_temperature_c,
                         last_humidity_pct)
    SELECT node, sensor, kind, '{t0}'::timestamptz, ts, seq, temperature_c, humidity_pct
      FROM ins
     WHERE seq >= {last_seq}
    RETURNING 1
)"""

# Runs in a subprocess on the code under test (PYTHONPATH): the current tree or the old one.
# "rate": writes the given steps in batches of `batch` readings and prints one JSON line;
# the first batch (which connects) is not timed. "stream": writes `batch` readings at a time,
# stamped now, until its standard input closes; one line per batch: start (monotonic, the
# same clock as the parent's), seconds, "ok <inserted>" or "error <message>"; then "next k".
_WRITER = r"""
import json, sys, threading, time
from datetime import UTC, datetime, timedelta
from sqlalchemy import create_engine
from pipeline.decode import Reading
from pipeline.store import Store

a = json.loads(sys.argv[1])
per_node, sensors, size = a["per_node"], a["sensors"], a["batch"]
store = Store(create_engine(a["url"], pool_size=1))

def steps(first, count, ts0, spacing_us):
    out = []
    for k in range(first, first + count):
        ts = ts0 + timedelta(microseconds=spacing_us * (k - first))
        for s in range(sensors):
            dht = s % 4 == 3
            out.append(Reading(f"node-{s // per_node:03d}", f"s{s % per_node}",
                               "dht22" if dht else "ds18b20", k * per_node + s % per_node, ts,
                               20.0 + (s % 7) / 10 + (k % 10) / 100, 55.0 if dht else None,
                               False))
    return out

if a["mode"] == "rate":
    rows = steps(a["first"], a["steps"], datetime.fromisoformat(a["ts0"]), a["spacing_us"])
    batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    inserted = store.write(batches[0]).inserted
    began = time.perf_counter()
    for batch in batches[1:]:
        inserted += store.write(batch).inserted
    took = time.perf_counter() - began
    print(json.dumps({"rows": len(rows) - len(batches[0]), "seconds": took,
                      "inserted": inserted, "total": len(rows)}))
else:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    per_batch = max(1, round(size / sensors))
    k = a["first"]
    while not stop.is_set():
        batch = steps(k, per_batch, datetime.now(UTC), 1)
        began = time.monotonic()
        try:
            outcome = f"ok {store.write(batch).inserted}"
        except Exception as exc:
            outcome = "error " + (str(exc).strip().splitlines() or ["?"])[0]
        print(began, time.monotonic() - began, outcome, flush=True)
        if outcome.startswith("error"):
            stop.wait(0.1)
        k += per_batch
    print("next", k, flush=True)
"""


@dataclass(frozen=True)
class Plan:
    """What is loaded: ``steps`` readings of each of ``sensors``, ``interval_us`` apart, from
    ``t0`` (a UTC midnight)."""

    sensors: int
    steps: int
    t0: datetime
    interval_us: int

    @property
    def readings(self) -> int:
        return self.sensors * self.steps

    @property
    def end(self) -> datetime:
        return self.t0 + timedelta(microseconds=self.interval_us * self.steps)

    def days(self) -> list[tuple[datetime, datetime, int, int]]:
        """(day start, day end, first step, end step) of each UTC day with readings."""
        out = []
        lo = self.t0
        while lo < self.end:
            hi = lo + timedelta(days=1)
            k_lo = -(-_us(lo - self.t0) // self.interval_us)
            k_hi = min(self.steps, -(-_us(hi - self.t0) // self.interval_us))
            if k_hi > k_lo:
                out.append((lo, hi, k_lo, k_hi))
            lo = hi
        return out


def _us(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass
class Lane:
    """One database and the code that writes it; the next step and time its writers use."""

    label: str
    what: str
    owner_url: str
    writer_url: str
    code: Path
    partitioned: bool
    next_step: int = 0
    next_ts: datetime = field(default_factory=lambda: datetime.now(UTC))

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.code)}

    def advance(self, steps: int, spacing_us: int) -> None:
        self.next_step += steps
        self.next_ts += timedelta(microseconds=spacing_us * steps)


# -- load --------------------------------------------------------------------------------------


def _partitions(conn: psycopg.Connection[tuple[object, ...]]) -> dict[datetime, str]:
    rows = conn.execute(
        "SELECT lo, part::text FROM partition_bounds('readings')"
        " WHERE lo > '-infinity' AND hi < 'infinity'"
    ).fetchall()
    return {lo: str(part) for lo, part in rows if isinstance(lo, datetime)}


def load(lane: Lane, plan: Plan) -> dict[str, float]:
    """Load ``plan`` into ``lane``'s database; the seconds each phase took."""
    took: dict[str, float] = {}
    with psycopg.connect(lane.owner_url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET work_mem = '512MB'")
        conn.execute("SET maintenance_work_mem = '1GB'")
        parts = _partitions(conn) if lane.partitioned else {}
        ranges = seq_ranges(conn) if lane.partitioned else None
        days = plan.days()
        if lane.partitioned and (missing := [d for d, *_ in days if d not in parts]):
            raise SystemExit(f"{lane.label}: no partition for {missing[0]:%Y-%m-%d}")
        indexes: list[Index] = []
        for table in ("readings", "readings_minute", "readings_10min"):
            indexes += drop_indexes(conn, table)
        began = time.monotonic()
        for i, (lo, hi, k_lo, k_hi) in enumerate(days):
            extra = ""
            if ranges:
                extra = _LOAD_RANGES.format(
                    table=ranges[0], keys=", ".join(ranges[1]), lo=lo.isoformat(), hi=hi.isoformat()
                )
            if k_hi == plan.steps:
                extra += _LOAD_LATEST.format(
                    t0=plan.t0.isoformat(), last_seq=(plan.steps - 1) * SENSORS_PER_NODE
                )
            statement = _LOAD.format(
                target=parts.get(lo, "readings"),
                per_node=SENSORS_PER_NODE,
                sensors=plan.sensors,
                interval_s=plan.interval_us / 1e6,
                interval_us=plan.interval_us,
                t0=plan.t0.isoformat(),
                k_lo=k_lo,
                k_hi=k_hi,
                extra=extra,
            )
            row = conn.execute(statement.encode()).fetchone()
            if row is None or row[0] != (k_hi - k_lo) * plan.sensors:
                raise SystemExit(f"{lane.label}: {row} rows inserted for steps {k_lo}-{k_hi}")
            if (i + 1) % max(1, len(days) // 5) == 0 or i + 1 == len(days):
                say(f"{lane.label}: {k_hi * plan.sensors:,} of {plan.readings:,} readings")
        took["rows and rollups"] = time.monotonic() - began
        took["indexes"] = rebuild_indexes(conn, indexes, report=False)
        began = time.monotonic()
        conn.execute(
            "VACUUM (ANALYZE) readings, readings_minute, readings_10min, sensors"
            + (f", {ranges[0]}" if ranges else "")
        )
        took["vacuum analyze"] = time.monotonic() - began
        size = conn.execute(
            "SELECT sum(pg_total_relation_size(relid)) FROM (SELECT 'readings'::regclass AS relid"
            " UNION SELECT relid FROM pg_partition_tree('readings')) AS t"
        ).fetchone()
        took["GB"] = float(size[0]) / 1e9 if size and size[0] is not None else 0.0
    return took


def set_raw_retention(conn: psycopg.Connection[tuple[object, ...]], days: int) -> list[str]:
    """As the owner: keep raw readings ``days`` days and maintain; what maintenance did."""
    conn.execute("UPDATE data_retention SET keep_days = %s WHERE level = 'raw'", (days,))
    return [
        f"{a} {p}" for a, p in conn.execute("SELECT action, partition FROM maintain_partitions()")
    ]


# -- writers -------------------------------------------------------------------------------------


def _writer_args(lane: Lane, plan: Plan, mode: str, **more: object) -> list[str]:
    args = {
        "url": lane.writer_url.replace("postgresql://", "postgresql+psycopg://"),
        "per_node": SENSORS_PER_NODE,
        "sensors": plan.sensors,
        "batch": BATCH,
        "mode": mode,
        "first": lane.next_step,
        **more,
    }
    return [sys.executable, "-c", _WRITER, json.dumps(args)]


def write_steps(lane: Lane, plan: Plan, steps: int, spacing_us: int) -> tuple[int, float]:
    """Write ``steps`` steps of every sensor through the lane's Store.write in a subprocess,
    continuing its sequence and time; (readings timed, seconds)."""
    done = subprocess.run(
        _writer_args(
            lane, plan, "rate", steps=steps, ts0=lane.next_ts.isoformat(), spacing_us=spacing_us
        ),
        env=lane.env(),
        cwd=lane.code,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{lane.label} writer failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["inserted"] != result["total"]:
        raise SystemExit(f"{lane.label}: {result['total'] - result['inserted']} keys collided")
    lane.advance(steps, spacing_us)
    return int(result["rows"]), float(result["seconds"])


@dataclass(frozen=True)
class Batch:
    began: float
    seconds: float
    outcome: str


class StreamWriter:
    """The lane's Store.write in a subprocess, one batch after another, stamped now."""

    def __init__(self, lane: Lane, plan: Plan) -> None:
        self.lane = lane
        self.batches: list[Batch] = []
        self.errors: list[str] = []
        self._next: int | None = None
        self._proc = subprocess.Popen(
            _writer_args(lane, plan, "stream"),
            env=lane.env(),
            cwd=lane.code,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._drain_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            began, seconds, outcome = [*line.split(" ", 2), "", ""][:3]
            if began == "next":
                self._next = int(seconds)
            else:
                self.batches.append(Batch(float(began), float(seconds), outcome.strip()))

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        self.errors.extend(self._proc.stderr)

    def wait_for(self, batches: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.batches) < batches:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"{self.lane.label} stream writer stopped after {len(self.batches)} batches:"
                    f"\n{''.join(self.errors)[-3000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> list[Batch]:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(60)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        for t in self._threads:
            t.join(10)
        if self._next is not None:
            self.lane.next_step = self._next
        self.lane.next_ts = datetime.now(UTC)
        return self.batches


@contextlib.contextmanager
def streaming(lane: Lane, plan: Plan) -> Iterator[StreamWriter]:
    writer = StreamWriter(lane, plan)
    try:
        yield writer
    finally:
        if writer._proc.poll() is None:
            writer.stop()


@dataclass(frozen=True)
class Stall:
    median_ms: float
    longest_ms: float
    during: int
    errors: list[str]


def stall(batches: list[Batch], t_start: float, t_end: float) -> Stall:
    """The writer's batches against [t_start, t_end]: the median batch outside it, the
    longest batch that overlaps it, and the errors from t_start on."""
    outside = [b.seconds for b in batches if b.began + b.seconds < t_start or b.began > t_end]
    during = [b for b in batches if b.began <= t_end and b.began + b.seconds >= t_start]
    errors = [
        b.outcome for b in batches if b.began + b.seconds >= t_start and b.outcome[:5] == "error"
    ]
    return Stall(
        statistics.median(outside) * 1000 if outside else math.nan,
        max((b.seconds for b in during), default=0.0) * 1000,
        len(during),
        errors,
    )


# -- measurements --------------------------------------------------------------------------------


def drain_messages(lane: Lane, plan: Plan, n: int) -> tuple[list[tuple[str, bytes]], int]:
    """``n`` readings (whole steps) continuing the lane's sensors, as the nodes publish them."""
    steps = math.ceil(n / plan.sensors)
    out = []
    for j in range(steps):
        k = lane.next_step + j
        ts = lane.next_ts + timedelta(microseconds=SPACING_US * j)
        for s in range(plan.sensors):
            dht = s % 4 == 3
            node, sensor = f"node-{s // SENSORS_PER_NODE:03d}", f"s{s % SENSORS_PER_NODE}"
            reading = Reading(
                node,
                sensor,
                "dht22" if dht else "ds18b20",
                k * SENSORS_PER_NODE + s % SENSORS_PER_NODE,
                ts,
                21.0 + (s % 7) / 10,
                55.0 if dht else None,
                False,
            )
            out.append((f"sensors.{node}.{sensor}", reading_payload(**reading._asdict())))
    return out, steps


def drain_into(
    broker: RabbitBroker, pg: PostgresServer, lane: Lane, messages: list[tuple[str, bytes]]
) -> tuple[float, dict[str, float]]:
    """Queue ``messages`` and run the lane's `pipeline consume` until all are stored;
    (readings/s from the moment it consumes, CPU seconds per party)."""
    first = json.loads(messages[0][1])["ts"]
    since = datetime.fromisoformat(first.replace("Z", "+00:00")) - timedelta(minutes=10)
    progress = [0, time.monotonic()]

    def stored(url: str) -> int:
        # bench.drain's count sums the whole ten-minute rollup, here about a million rows
        # long; the buckets these readings fall in are enough. No progress for two minutes
        # means the consumer is stuck: stop rather than wait for ever.
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(n), 0) FROM readings_10min WHERE bucket >= %s", (since,)
            ).fetchone()
        got = int(row[0]) if row else 0
        if got != progress[0]:
            progress[:] = [got, time.monotonic()]
        elif time.monotonic() - progress[1] > 120:
            raise TimeoutError(f"{lane.label}: the consumer stored nothing for 120 s")
        return got

    before = stored(lane.writer_url)
    drain.publish(broker, messages)
    label = f"{lane.label} drain"
    env = {"PYTHONPATH": str(lane.code), "PIPELINE_MAINTAIN_INTERVAL_S": "0"}
    # bench.drain's runner, on the lane's code (PYTHONPATH) and with the count above.
    with mock.patch.object(drain, "count_rows", stored), mock.patch.dict(os.environ, env):
        drain.ours(broker, pg, lane.writer_url, before + len(messages), 1, label=label)
    return len(messages) / drain.DRAIN_S[label], drain.CPU_SPLIT[label]


def summary_compare(p: Lane, u: Lane) -> int:
    """sensor_summary over one window on both: the same count, min and max for each sensor."""
    t1 = datetime.now(UTC)
    t0 = t1 - timedelta(hours=1)
    query = "SELECT * FROM sensor_summary(%s, %s)"
    with (
        psycopg.connect(p.owner_url, autocommit=True) as cp,
        psycopg.connect(u.owner_url, autocommit=True) as cu,
    ):
        rows_p = cp.execute(query, (t0, t1)).fetchall()
        rows_u = cu.execute(query, (t0, t1)).fetchall()
    ours = {(r[0], r[1]): (r[3], r[5], r[6]) for r in rows_p}
    base = {(r[0], r[1]): (r[3], r[5], r[6]) for r in rows_u}
    if ours != base or not ours:
        diff = sorted(k for k in ours.keys() | base.keys() if ours.get(k) != base.get(k))
        raise SystemExit(f"P and U summaries differ for {len(diff)} sensors, e.g. {diff[:1]}")
    if not all(r[12] for r in rows_p):
        raise SystemExit("P's summary of the last hour says it is not exact")
    return len(ours)


def summary_timings(p: Lane, u: Lane, queries: int) -> tuple[list[float], list[float]]:
    """Interleaved: one query on P, one on U, ``queries`` times; milliseconds until the client
    holds every row (binary results)."""
    times: tuple[list[float], list[float]] = ([], [])
    with (
        psycopg.connect(p.owner_url, autocommit=True) as cp,
        psycopg.connect(u.owner_url, autocommit=True) as cu,
    ):
        for i in range(queries + 5):
            for conn, out in ((cp, times[0]), (cu, times[1])):
                began = time.perf_counter()
                conn.execute(OURS, binary=True).fetchall()
                if i >= 5:  # the first five warm the caches
                    out.append((time.perf_counter() - began) * 1000)
    return times


@dataclass
class Drop:
    partition: str = ""
    lo: datetime | None = None
    hi: datetime | None = None
    rows: int = 0
    seconds: float = 0.0
    actions: list[str] = field(default_factory=list)
    stall: Stall | None = None


def retention_drop(p: Lane, plan: Plan, days: int) -> Drop:
    """Drop P's oldest day by lowering its raw retention, while a writer inserts."""
    out = Drop()
    with psycopg.connect(p.owner_url, autocommit=True) as conn:
        set_raw_retention(conn, days)  # settled: nothing but what the timed call drops
        first = conn.execute(
            "SELECT part::text, lo, hi FROM partition_bounds('readings')"
            " WHERE lo > '-infinity' ORDER BY lo LIMIT 1"
        ).fetchone()
        assert first is not None
        assert isinstance(first[1], datetime)
        assert isinstance(first[2], datetime)
        out.partition, out.lo, out.hi = str(first[0]), first[1], first[2]
        counted = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(out.partition))
        ).fetchone()
        out.rows = int(counted[0]) if counted else 0
        with streaming(p, plan) as writer:
            writer.wait_for(40)
            t_start = time.monotonic()
            out.actions = set_raw_retention(conn, days - 1)
            t_end = time.monotonic()
            writer.wait_for(len(writer.batches) + 40)
            out.stall = stall(writer.stop(), t_start, t_end)
        out.seconds = t_end - t_start
    return out


@dataclass
class Delete:
    rows: int = 0
    seconds: float = 0.0
    vacuum_seconds: float = 0.0
    stall: Stall | None = None


def delete_day(u: Lane, plan: Plan, lo: datetime, hi: datetime) -> Delete:
    """The same day's rows from U without partitions: DELETE, then VACUUM; a writer inserts."""
    out = Delete()
    with psycopg.connect(u.owner_url, autocommit=True) as conn, streaming(u, plan) as writer:
        writer.wait_for(40)
        t_start = time.monotonic()
        out.rows = conn.execute(
            "DELETE FROM readings WHERE ts >= %s AND ts < %s", (lo, hi)
        ).rowcount
        out.seconds = time.monotonic() - t_start
        conn.execute("VACUUM readings")
        t_end = time.monotonic()
        out.vacuum_seconds = t_end - t_start - out.seconds
        writer.wait_for(len(writer.batches) + 40)
        out.stall = stall(writer.stop(), t_start, t_end)
    return out


@dataclass
class Migration:
    rows: int = 0
    seconds: float = 0.0
    stall: Stall | None = None


def migrate_u(u: Lane, plan: Plan) -> Migration:
    """U to the latest schema while the old code's writer inserts."""
    out = Migration()
    with psycopg.connect(u.owner_url, autocommit=True) as conn:
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'readings'::regclass")
        got = row.fetchone()
        out.rows = int(float(got[0])) if got else 0
    with streaming(u, plan) as writer:
        writer.wait_for(40)
        t_start = time.monotonic()
        migrate(u.owner_url)
        t_end = time.monotonic()
        time.sleep(1)  # what the writer meets on the migrated schema
        writer.wait_for(len(writer.batches) + 5)
        out.stall = stall(writer.stop(), t_start, t_end)
    out.seconds = t_end - t_start
    return out


# -- the run -------------------------------------------------------------------------------------


def old_tree(into: Path) -> Path:
    """The pipeline package of commit OLD_COMMIT, extracted under ``into``; its src dir."""
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", OLD_COMMIT, "pipeline/src/pipeline"],
        stdout=subprocess.PIPE,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {OLD_COMMIT} failed")
    return into / "pipeline" / "src"


def make_lanes(pg: PostgresServer, old_src: Path) -> tuple[Lane, Lane]:
    name_p, url_p = pg.owned_database("part")
    name_u = pg.create_database("unpart")
    pg.init_roles(name_u)
    url_u = pg.role_url(name_u, "owner")
    migrate(url_u, upto=5)
    p = Lane("P", "partitioned, current code", url_p, pg.role_url(name_p, "pipeline"),
             CURRENT_SRC, partitioned=True)  # fmt: skip
    u = Lane("U", f"unpartitioned, code {OLD_COMMIT}", url_u, pg.role_url(name_u, "pipeline"),
             old_src, partitioned=False)  # fmt: skip
    return p, u


def plan_for(args: argparse.Namespace) -> Plan:
    """Readings over --days whole UTC days and today, ending early enough that what the write
    and drain rounds add after them (SPACING_US apart) still lies in the past."""
    now = datetime.now(UTC)
    steps = args.readings // args.sensors
    later = args.repeat * (
        math.ceil(args.write_readings / args.sensors)
        + math.ceil(args.drain_readings / args.sensors)
    )
    end = now - timedelta(microseconds=later * SPACING_US) - timedelta(minutes=2)
    t0 = (now - timedelta(days=args.days)).replace(hour=0, minute=0, second=0, microsecond=0)
    return Plan(args.sensors, steps, t0, _us(end - t0) // steps)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _stall_line(s: Stall | None) -> str:
    if s is None:
        return ""
    return (
        f"writer: longest batch {s.longest_ms:.0f} ms during it ({s.during} batches) vs median"
        f" {s.median_ms:.0f} ms ({_ratio(s.longest_ms, s.median_ms)})"
    )


@dataclass
class Results:
    writes: dict[str, list[float]] = field(default_factory=lambda: {"P": [], "U": []})
    drains: dict[str, list[float]] = field(default_factory=lambda: {"P": [], "U": []})
    cpu: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"P": [], "U": []})
    sensors_seen: int = 0
    summary: dict[str, list[float]] = field(default_factory=dict)
    drop: Drop = field(default_factory=Drop)
    delete: Delete = field(default_factory=Delete)
    migration: Migration = field(default_factory=Migration)


def load_both(p: Lane, u: Lane, plan: Plan) -> None:
    """Both databases at once (one backend each), then the writers continue from the end."""
    began = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(load, lane, plan) for lane in (p, u)]
        took = [f.result() for f in loads]
    wall = time.monotonic() - began
    for lane, t in zip((p, u), took, strict=True):
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "GB")
        say(f"{lane.label} loaded: {phases}; readings {t['GB']:.1f} GB with indexes")
    say(
        f"load: {2 * plan.readings:,} readings in {wall:.0f} s, both databases at once"
        f" ({2 * plan.readings / wall:,.0f} readings/s)"
    )
    for lane in (p, u):
        lane.next_step, lane.next_ts = plan.steps, plan.end


def rounds(
    p: Lane,
    u: Lane,
    plan: Plan,
    *,
    args: argparse.Namespace,
    broker: RabbitBroker,
    pg: PostgresServer,
    out: Results,
) -> None:
    """(a) and (b), --repeat interleaved rounds, P first in odd rounds and U first in even."""
    for round_ in range(args.repeat):
        order = (p, u) if round_ % 2 == 0 else (u, p)
        steps = math.ceil(args.write_readings / plan.sensors)
        for lane in order:
            rows, seconds = write_steps(lane, plan, steps, SPACING_US)
            out.writes[lane.label].append(rows / seconds)
            say(f"(a) round {round_ + 1}: {lane.label} {rows / seconds:,.0f} rows/s")
        assert (p.next_step, p.next_ts) == (u.next_step, u.next_ts)
        messages, steps = drain_messages(p, plan, args.drain_readings)
        for lane in order:
            rate, split = drain_into(broker, pg, lane, messages)
            out.drains[lane.label].append(rate)
            out.cpu[lane.label].append({k: v / len(messages) * 1e6 for k, v in split.items()})
            say(f"(b) round {round_ + 1}: {lane.label} {rate:,.0f} readings/s")
        for lane in (p, u):
            lane.advance(steps, SPACING_US)


def summaries(p: Lane, u: Lane, plan: Plan, queries: int, out: Results) -> None:
    """(c), after writing both up to now at the loaded pace, as the consumers would have."""
    steps = _us(datetime.now(UTC) - p.next_ts) // plan.interval_us
    if steps > 0:
        for lane in (p, u):
            write_steps(lane, plan, steps, plan.interval_us)
        say(f"caught up to now: {steps * plan.sensors:,} readings in each")
    out.sensors_seen = summary_compare(p, u)
    say(f"P's summary equals U's for all {out.sensors_seen} sensors, and says it is exact")
    out.summary["P"], out.summary["U"] = summary_timings(p, u, queries)


def run(args: argparse.Namespace, plan: Plan) -> tuple[Lane, Lane, Results]:
    out = Results()
    with (
        tempfile.TemporaryDirectory(prefix="tempmon-old-") as tmp,
        PostgresServer() as pg,
    ):
        p, u = make_lanes(pg, old_tree(Path(tmp)))
        with psycopg.connect(p.owner_url, autocommit=True) as conn:
            set_raw_retention(conn, args.days)
        load_both(p, u, plan)
        with RabbitBroker() as broker:
            rounds(p, u, plan, args=args, broker=broker, pg=pg, out=out)
        summaries(p, u, plan, args.queries, out)
        out.drop = retention_drop(p, plan, args.days)
        assert out.drop.lo is not None
        assert out.drop.hi is not None
        out.delete = delete_day(u, plan, out.drop.lo, out.drop.hi)
        out.migration = migrate_u(u, plan)
    return p, u, out


def report(args: argparse.Namespace, p: Lane, u: Lane, out: Results) -> None:
    print()
    print(f"P: {p.what}; U: {u.what}. Ratios P/U, same run.")
    wp, wu = statistics.median(out.writes["P"]), statistics.median(out.writes["U"])
    print(
        f"(a) write rate, Store.write, {BATCH:,}-reading batches, one thread, median of"
        f" {args.repeat}: P {wp:,.0f} rows/s, U {wu:,.0f} rows/s, {_ratio(wp, wu)}"
    )
    dp, du = statistics.median(out.drains["P"]), statistics.median(out.drains["U"])
    print(
        f"(b) drain, pipeline consume x1, {args.drain_readings:,} readings, median of"
        f" {args.repeat}: P {dp:,.0f} readings/s, U {du:,.0f} readings/s, {_ratio(dp, du)}"
        f" (target >= 0.90: {_met(dp / du >= 0.9)})"
    )
    for label in ("P", "U"):
        cpu = out.cpu[label]
        split = {k: statistics.median(c[k] for c in cpu) for k in cpu[0]}
        cells = ", ".join(f"{k} {v:.1f} us" for k, v in split.items())
        print(f"    CPU per reading, {label}: {cells}")
    sp, su = out.summary["P"], out.summary["U"]
    p50p, p50u = statistics.median(sp), statistics.median(su)
    print(
        f"(c) summary, sensor_summary_last_hour, {args.queries} queries, {out.sensors_seen}"
        f" sensors: P p50 {p50p:.1f} ms p99 {pct(sp, 99):.1f} ms, U p50 {p50u:.1f} ms p99"
        f" {pct(su, 99):.1f} ms, p50 {_ratio(p50p, p50u)}"
        f" (target <= 1.10: {_met(p50p / p50u <= 1.1)})"
    )
    drop, delete, migration = out.drop, out.delete, out.migration
    print(
        f"(d) retention drop, maintain_partitions(): {drop.partition} ({drop.rows:,} rows) in"
        f" {drop.seconds:.3f} s (target < 1 s: {_met(drop.seconds < 1)});"
        f" {_stall_line(drop.stall)}"
    )
    print(f"    it did: {'; '.join(drop.actions) or 'nothing'}")
    print(
        f"    baseline, U: DELETE of the same day ({delete.rows:,} rows) {delete.seconds:.1f} s"
        f" + VACUUM {delete.vacuum_seconds:.1f} s; drop / (DELETE + VACUUM)"
        f" {_ratio(drop.seconds, delete.seconds + delete.vacuum_seconds)};"
        f" {_stall_line(delete.stall)}"
    )
    print(
        f"(e) migration of U to the latest schema: {migration.seconds:.1f} s for about"
        f" {migration.rows:,} rows ({migration.seconds / max(1, migration.rows) * 1e7:.2f} s per"
        f" 10 million); {_stall_line(migration.stall)}"
    )
    if migration.stall and migration.stall.errors:
        print(
            f"    the old code's writer failed {len(migration.stall.errors)} times on the"
            f" migrated schema: {migration.stall.errors[0]}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=50_000_000, help="per database")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--sensors", type=int, default=200)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (a) and (b)")
    parser.add_argument("--write-readings", type=int, default=200_000)
    parser.add_argument("--drain-readings", type=int, default=200_000)
    args = parser.parse_args()
    if not 2 <= args.days <= 366:
        parser.error("--days: 2 to 366 (the drop lowers the retention by one day)")
    if args.sensors % SENSORS_PER_NODE or args.readings < args.sensors * args.days:
        parser.error(f"--sensors: a multiple of {SENSORS_PER_NODE}, with readings for every day")
    if min(args.write_readings, args.drain_readings) < 2 * BATCH or args.repeat < 1:
        parser.error(f"--write-readings and --drain-readings: at least {2 * BATCH}")
    plan = plan_for(args)
    print(
        f"partitions at scale: {plan.readings:,} readings per database, {plan.sensors} sensors,"
        f" one each every {plan.interval_us / 1e6:.3f} s from {plan.t0:%Y-%m-%d %H:%M} to"
        f" {plan.end:%Y-%m-%d %H:%M} UTC ({len(plan.days())} daily partitions);"
        f" {os.cpu_count()} cores",
        flush=True,
    )
    p, u, out = run(args, plan)
    report(args, p, u, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
