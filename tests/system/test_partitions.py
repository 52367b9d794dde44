"""Time partitions and retention (issue 15): readings by day, rollups by month and year.

Exactly once holds across partitions: a redelivery is one row on either side of midnight, and
a sequence number reused on another day is refused like one reused on the same day. Old data
goes by dropping whole partitions, and the summary says when it is no longer exact.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from pipeline.db import make_engine
from pipeline.decode import Reading
from pipeline.migrate import migrate
from pipeline.retention import (
    PartitionMaintainer,
    RetentionPolicy,
    apply_policy,
    maintain,
    retention_state,
)
from pipeline.store import BatchResult, Store
from tests.conftest import Database
from tests.harness.postgres import PostgresServer

pytestmark = pytest.mark.system

_NOW = datetime.now(UTC)
_MIDNIGHT = _NOW.replace(hour=0, minute=0, second=0, microsecond=0)


def _reading(seq: int, ts: datetime, *, sensor: str = "t1", temperature_c: float = 21.5) -> Reading:
    return Reading(
        node="pi-1",
        sensor=sensor,
        kind="ds18b20",
        seq=seq,
        ts=ts,
        temperature_c=temperature_c,
        humidity_pct=None,
        time_uncertain=False,
    )


@pytest.fixture
def engine(database: Database) -> Iterator[Engine]:
    engine = make_engine(database.writer_url)
    yield engine
    engine.dispose()


def _query(database: Database, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.owner_url) as conn:
        return conn.execute(sql, params).fetchall()


def _partitions(database: Database, table: str) -> list[str]:
    rows = _query(
        database,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass ORDER BY 1",
        table,
    )
    return [r[0] for r in rows]


def test_a_new_database_has_partitions_for_the_retention_and_a_week_ahead(
    database: Database,
) -> None:
    days = _partitions(database, "readings")
    first = _MIDNIGHT - timedelta(days=30)
    wanted = [f"readings_p{first + timedelta(days=n):%Y%m%d}" for n in range(38)]
    assert days == wanted
    # Every day has its own unique key on (node, sensor, seq): the arbiter of ON CONFLICT.
    keyed = _query(
        database,
        "SELECT c.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_class c ON c.oid = x.indrelid WHERE x.indisunique"
        " AND pg_get_indexdef(x.indexrelid) LIKE '%%(node, sensor, seq)'"
        " AND c.relname LIKE 'readings_p%%' ORDER BY 1",
    )
    assert [r[0] for r in keyed] == wanted
    assert _partitions(database, "readings_minute")[-2:] == [
        f"readings_minute_p{_MIDNIGHT:%Y%m}",
        f"readings_minute_p{(_MIDNIGHT.replace(day=1) + timedelta(days=32)):%Y%m}",
    ]
    # Kept for ever: as far back as the minutes are kept (400 days), and a year ahead.
    first_year = (_NOW - timedelta(days=400)).year
    assert _partitions(database, "readings_10min") == [
        f"readings_10min_p{year}" for year in range(first_year, _NOW.year + 2)
    ]
    # Maintenance again changes nothing.
    with make_engine(database.writer_url).connect() as conn:
        assert maintain(conn) == []


def test_a_redelivery_across_midnight_is_one_row_each_and_counted_once(
    engine: Engine, database: Database
) -> None:
    store = Store(engine)
    yesterday = _MIDNIGHT - timedelta(days=1)
    batch = [
        _reading(1, yesterday - timedelta(milliseconds=1), temperature_c=20.0),
        _reading(2, yesterday, temperature_c=22.0),
        _reading(3, yesterday + timedelta(milliseconds=1), temperature_c=24.0),
    ]
    assert store.write(batch) == BatchResult(inserted=3, duplicates=0, statuses=0)
    assert store.write(batch) == BatchResult(inserted=0, duplicates=3, statuses=0)
    assert store.write(list(reversed(batch))) == BatchResult(inserted=0, duplicates=3, statuses=0)
    where = _query(database, "SELECT tableoid::regclass::text, seq FROM readings ORDER BY seq")
    assert where == [
        (f"readings_p{yesterday - timedelta(days=1):%Y%m%d}", 1),
        (f"readings_p{yesterday:%Y%m%d}", 2),
        (f"readings_p{yesterday:%Y%m%d}", 3),
    ]
    assert _query(database, "SELECT sum(n) FROM readings_minute") == [(3,)]
    assert _query(database, "SELECT sum(n) FROM readings_10min") == [(3,)]


def test_a_key_reused_on_another_day_is_refused_in_the_same_batch_or_later(
    engine: Engine, database: Database
) -> None:
    store = Store(engine)
    day1 = _NOW - timedelta(days=3)
    day2 = _NOW - timedelta(days=1)
    # Two readings of one batch share a key across two days: one is stored, one refused.
    result = store.write([_reading(10, day1), _reading(10, day2, temperature_c=30.0)])
    assert (result.inserted, result.conflicts, result.duplicates) == (1, 1, 0)
    assert result.refused[0][1].startswith("sequence number reused with different content")
    # Later batches: a key of day 1 reused on day 2 and on today; a redelivery of day 1.
    store.write([_reading(11, day1), _reading(12, day1)])
    result = store.write([_reading(11, day2), _reading(12, _NOW), _reading(11, day1)])
    assert (result.inserted, result.conflicts, result.duplicates) == (0, 2, 1)
    assert sorted(i for i, _ in result.refused) == [0, 1]
    assert _query(database, "SELECT count(*) FROM readings") == [(3,)]


def test_a_number_inside_another_days_range_but_not_stored_there_is_new(
    engine: Engine, database: Database
) -> None:
    """Held back by the batch statement, looked up in that day, then written after all."""
    store = Store(engine)
    day1 = _NOW - timedelta(days=2)
    store.write([_reading(10, day1), _reading(80, day1 + timedelta(minutes=10))])
    late = [_reading(50, _NOW, sensor="t2"), _reading(81, _NOW)]  # 50 lies in day 1's range
    assert store.write(late) == BatchResult(inserted=2, duplicates=0, statuses=0)
    assert store.write(late) == BatchResult(inserted=0, duplicates=2, statuses=0)
    assert _query(database, "SELECT count(*) FROM readings") == [(4,)]
    assert _query(database, "SELECT sum(n) FROM readings_minute") == [(4,)]


def test_batches_committed_out_of_order_store_everything(
    engine: Engine, database: Database
) -> None:
    """The later batch commits first (two writers, two replicas): the earlier one's sequence
    numbers lie below the sensor's stored ones and are looked up, and found new."""
    store = Store(engine)
    start = _NOW - timedelta(hours=2)
    first = [_reading(n, start + timedelta(seconds=n)) for n in range(0, 100, 2)]
    later = [_reading(n, start + timedelta(seconds=n)) for n in range(100, 200, 2)]
    assert store.write(later).inserted == 50
    assert store.write(first) == BatchResult(inserted=50, duplicates=0, statuses=0)
    assert _query(database, "SELECT count(*), sum(n) FROM readings_minute") != []
    assert _query(database, "SELECT count(*) FROM readings") == [(100,)]
    ranges = _query(database, "SELECT min_seq, max_seq FROM node_seq_ranges")
    assert ranges == [(0, 198)]


def test_a_reading_older_than_the_retention_is_refused_with_its_reason(engine: Engine) -> None:
    store = Store(engine)
    old = _MIDNIGHT - timedelta(days=31, seconds=1)
    result = store.write([_reading(1, _NOW), _reading(2, old), _reading(3, _NOW)])
    assert result.inserted == 2
    assert [i for i, _ in result.refused] == [1]
    reason = result.refused[0][1]
    assert reason.startswith(f"ts={old:%Y-%m-%dT%H:%M:%S}")
    assert "is older than the readings the database keeps" in reason
    assert "raw retention 30 days" in reason


def test_a_writer_makes_missing_partitions_itself_instead_of_refusing(
    engine: Engine, database: Database
) -> None:
    """Maintenance that has not run for days: the partitions ahead ran out."""
    store = Store(engine)
    store.write([_reading(1, _NOW)])  # the store has read which days exist
    ahead = [
        name for name in _partitions(database, "readings") if name > f"readings_p{_NOW:%Y%m%d}"
    ]
    with psycopg.connect(database.owner_url) as conn:
        for name in ahead:
            conn.execute(f"DROP TABLE {name}")
    tomorrow = _MIDNIGHT + timedelta(days=1, hours=1)
    assert store.write([_reading(2, tomorrow)]).inserted == 1
    assert f"readings_p{tomorrow:%Y%m%d}" in _partitions(database, "readings")


def _summary(database: Database, t0: datetime, t1: datetime) -> list[tuple[Any, ...]]:
    return _query(
        database,
        "SELECT sensor, readings, avg_c, min_c, max_c, first_ts, last_ts, exact"
        " FROM sensor_summary(%s, %s) ORDER BY sensor",
        t0,
        t1,
    )


def test_retention_drops_whole_days_and_the_summary_says_it_is_no_longer_exact(
    engine: Engine, database: Database
) -> None:
    store = Store(engine)
    # One reading every 20 s, five days back, with a temperature that tells them apart.
    start = _MIDNIGHT - timedelta(days=5)
    stamps = [start + timedelta(seconds=20 * n + 7) for n in range(5 * 24 * 180)]
    readings = [_reading(n, ts, temperature_c=float(n % 1000)) for n, ts in enumerate(stamps)]
    for i in range(0, len(readings), 5000):
        store.write(readings[i : i + 5000])
    t0 = start + timedelta(days=1, minutes=3, seconds=30)  # mid-minute: a raw edge
    t1 = start + timedelta(days=1, hours=2, seconds=50)
    exact = _summary(database, t0, t1)
    inside = [r for r in readings if t0 < r.ts <= t1]
    assert exact[0][1] == len(inside)
    assert exact[0][7] is True

    apply_policy(database.owner_url, RetentionPolicy(raw_days=2, minute_days=400))
    with engine.connect() as conn:
        actions = maintain(conn)
        state = {row["level"]: row for row in retention_state(conn)}
    dropped = sorted(a.partition for a in actions if a.action == "dropped")
    horizon = _MIDNIGHT - timedelta(days=2)
    assert dropped == [
        f"readings_p{day:%Y%m%d}"
        for day in (_MIDNIGHT - timedelta(days=n) for n in range(30, 2, -1))
    ]
    assert state["raw"]["kept_from"] == horizon
    kept = _query(database, "SELECT min(ts), count(*) FROM readings")[0]
    assert kept[0] >= horizon
    assert kept[1] == sum(1 for r in readings if r.ts >= horizon)
    assert _query(database, "SELECT min(lo) FROM node_seq_ranges")[0][0] >= horizon

    # Beyond the raw retention the window's ends widen to whole minutes: the count is that of
    # the readings in the whole minutes that hold t0 and t1, from the minute rollup.
    wide = _summary(database, t0, t1)
    m0 = t0.replace(second=0)
    m1 = t1.replace(second=0) + timedelta(minutes=1)
    covered = [r for r in readings if m0 <= r.ts < m1]
    assert wide[0][1] == len(covered)
    assert math.isclose(wide[0][2], sum(r.temperature_c for r in covered) / len(covered))
    assert wide[0][3] == min(r.temperature_c for r in covered)
    assert wide[0][4] == max(r.temperature_c for r in covered)
    assert (wide[0][5], wide[0][6]) == (covered[0].ts, covered[-1].ts)
    assert wide[0][7] is False
    # Inside the raw retention it stays exact, and a window on whole minutes beyond it too
    # counts the same readings (only `exact` says the raw rows are gone).
    recent = _summary(database, _NOW - timedelta(hours=30), _NOW)
    assert recent[0][7] is True
    assert recent[0][1] == sum(1 for r in readings if _NOW - timedelta(hours=30) < r.ts)


# --- An existing database: migration 0006 while readings keep arriving -------------------------


@pytest.fixture
def database_v5(postgres: PostgresServer) -> Iterator[tuple[str, str, str]]:
    """A database migrated up to 0005 (unpartitioned); (name, owner URL, writer URL)."""
    name = postgres.create_database("v5")
    postgres.init_roles(name)
    owner = postgres.role_url(name, "owner")
    migrate(owner, upto=5)
    yield name, owner, postgres.role_url(name, "pipeline")
    postgres.start()
    postgres.drop_database(name)


_ROLLUPS_V5 = """
INSERT INTO readings_minute
SELECT node, sensor, date_trunc('minute', ts), max(kind), count(*), sum(temperature_c),
       min(temperature_c), max(temperature_c), count(humidity_pct), sum(humidity_pct),
       min(humidity_pct), max(humidity_pct), min(ts), max(ts)
  FROM readings GROUP BY 1, 2, 3;
INSERT INTO readings_10min
SELECT node, sensor, date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
       max(kind), sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h), min(min_h),
       max(max_h), min(first_ts), max(last_ts)
  FROM readings_minute GROUP BY 1, 2, 3;
INSERT INTO sensors (node, sensor, kind, last_ts, last_seq, last_temperature_c)
SELECT DISTINCT ON (node, sensor) node, sensor, kind, ts, seq, temperature_c
  FROM readings ORDER BY node, sensor, ts DESC;
"""


class _LiveWriter(threading.Thread):
    """Inserts 100 readings at a time, as a consumer would, and times every statement."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self._url = url
        self.halt = threading.Event()
        self.stored = 0
        self.longest_s = 0.0
        self.errors: list[str] = []

    def run(self) -> None:
        seq = 0
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self.halt.is_set():
                rows = [("live", "t1", seq + i, "cpu", datetime.now(UTC), 40.0) for i in range(100)]
                began = time.monotonic()
                try:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO readings (node, sensor, seq, kind, ts, temperature_c)"
                            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                            rows,
                        )
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                    continue
                self.longest_s = max(self.longest_s, time.monotonic() - began)
                self.stored += len(rows)
                seq += len(rows)


@pytest.mark.slow
def test_an_existing_table_becomes_partitioned_without_losing_a_row_or_stalling_ingest(
    database_v5: tuple[str, str, str],
) -> None:
    _name, owner, writer = database_v5
    nodes, minutes = 16, 45 * 24 * 60  # 45 days: some rows are already past the retention
    start = _MIDNIGHT - timedelta(minutes=minutes - 60 * 20)
    with psycopg.connect(owner) as conn:
        conn.execute(
            "INSERT INTO readings (node, sensor, seq, kind, ts, temperature_c, humidity_pct)"
            " SELECT 'pi-' || s, 't1', m, 'dht22', %s + m * interval '1 minute',"
            " 15 + (m %% 97) / 10.0, 40 + (m %% 13)"
            " FROM generate_series(0, %s - 1) AS m, generate_series(1, %s) AS s",
            (start, minutes, nodes),
        )
        conn.execute(_ROLLUPS_V5)
    window = (_NOW - timedelta(days=40, minutes=7, seconds=30), _NOW - timedelta(days=2))
    fingerprint = (
        "SELECT count(*), sum(seq), sum(temperature_c::numeric), min(ts), max(ts) FROM readings"
        " WHERE node <> 'live'"
    )
    with psycopg.connect(owner) as conn:
        before = conn.execute(fingerprint).fetchone()
        summary_before = conn.execute(
            "SELECT * FROM sensor_summary(%s, %s) ORDER BY node", window
        ).fetchall()
    assert before is not None
    assert before[0] == nodes * minutes

    live = _LiveWriter(writer)
    live.start()
    time.sleep(1.0)
    began = time.monotonic()
    ran = migrate(owner)
    took = time.monotonic() - began
    time.sleep(1.0)
    live.halt.set()
    live.join(30)
    print(f"migrated {before[0]} rows in {took:.2f} s; longest insert {live.longest_s:.2f} s")

    # 0007 (pressure) and 0008 (the id CHECKs) on the partitioned table, as it is written to
    assert [m.version for m in ran] == [6, 7, 8]
    assert not live.errors, live.errors[:3]
    assert live.longest_s < max(10.0, took + 2.0)
    with psycopg.connect(owner) as conn:
        assert conn.execute(fingerprint).fetchone() == before
        assert conn.execute("SELECT count(*) FROM readings WHERE node = 'live'").fetchone() == (
            live.stored,
        )
        summary_after = conn.execute(
            "SELECT * FROM sensor_summary(%s, %s) ORDER BY node", window
        ).fetchall()
        legacy = conn.execute(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'readings_legacy'"
        ).fetchone()
    assert legacy is not None
    assert legacy[0].startswith("FOR VALUES FROM (MINVALUE) TO (")
    # The same numbers (means to rounding: sums may add up in another order), now with a
    # last column saying they are exact.
    assert len(summary_after) == len(summary_before) == nodes
    for after, old in zip(summary_after, summary_before, strict=True):
        assert after[:4] + after[5:7] + after[8:12] == old[:4] + old[5:7] + old[8:12]
        assert math.isclose(after[4], old[4])
        assert math.isclose(after[7], old[7])
    assert all(row[12] is True for row in summary_after)

    # The old rows still guard their keys: a reading reusing one on a new day is refused.
    engine = make_engine(writer)
    try:
        store = Store(engine)
        after_legacy = _MIDNIGHT + timedelta(days=1, hours=3)
        reused = Reading("pi-3", "t1", "dht22", 5, after_legacy, 99.0, None, False)
        result = store.write([reused])
        assert result.conflicts == 1, result
        assert "sequence number reused" in result.refused[0][1]
    finally:
        engine.dispose()


def test_beyond_the_minute_retention_the_summary_reads_ten_minute_buckets(
    database: Database,
) -> None:
    """Rollups of 70 days ago (written directly: raw readings that old are refused)."""
    old = (_MIDNIGHT - timedelta(days=70)).replace(hour=12)
    with psycopg.connect(database.owner_url) as conn:
        for minute in range(60):
            at = old + timedelta(minutes=minute)
            conn.execute(
                "INSERT INTO readings_minute VALUES"
                " ('pi-1', 't1', %s, 'cpu', 6, %s, %s, %s, 0, NULL, NULL, NULL, %s, %s)",
                (at, 6.0 * minute, minute, minute, at, at + timedelta(seconds=50)),
            )
        conn.execute(
            "INSERT INTO readings_10min SELECT node, sensor,"
            " date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01 00:00:00+00'), max(kind),"
            " sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h), min(min_h),"
            " max(max_h), min(first_ts), max(last_ts) FROM readings_minute GROUP BY 1, 2, 3"
        )
    t0, t1 = old + timedelta(minutes=12, seconds=30), old + timedelta(minutes=31, seconds=5)
    # Older than the oldest readings partition: the ends widen to whole minutes, 12:12 to
    # 12:32, from the minute rollup.
    minutes = _summary(database, t0, t1)
    assert minutes[0][1:5] == (6 * 20, sum(range(12, 32)) / 20, 12.0, 31.0)
    assert minutes[0][7] is False

    apply_policy(database.owner_url, RetentionPolicy(raw_days=30, minute_days=35))
    with make_engine(database.writer_url).connect() as conn:
        dropped = [a.partition for a in maintain(conn) if a.action == "dropped"]
    assert f"readings_minute_p{old:%Y%m}" in dropped
    # Now the window widens to the ten-minute buckets holding its ends: 12:10 to 12:40.
    wide = _summary(database, t0, t1)
    assert wide[0][1:5] == (6 * 30, sum(range(10, 40)) / 30, 10.0, 39.0)
    assert wide[0][7] is False


def test_the_consumers_maintainer_makes_what_is_missing_at_start(database: Database) -> None:
    with psycopg.connect(database.owner_url) as conn:
        for name in _partitions(database, "readings")[-3:]:
            conn.execute(f"DROP TABLE {name}")
    engine = make_engine(database.writer_url)
    try:
        maintainer = PartitionMaintainer(engine, every_s=3600)
        maintainer.start()
        deadline = time.monotonic() + 30
        while not maintainer.actions and time.monotonic() < deadline:
            time.sleep(0.1)
        maintainer.stop()
        maintainer.join(10)
    finally:
        engine.dispose()
    assert [a.action for a in maintainer.actions] == ["created"] * 3
    assert len(_partitions(database, "readings")) == 38


def test_the_writer_role_cannot_change_the_retention(database: Database) -> None:
    with (
        psycopg.connect(database.writer_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("UPDATE data_retention SET keep_days = 1")
    with (
        psycopg.connect(database.writer_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(f"DROP TABLE readings_p{_NOW:%Y%m%d}")


def _pipeline(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env={**os.environ, "DATABASE_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_migrate_sets_the_retention_and_maintain_applies_it(database: Database) -> None:
    done = _pipeline(database.owner_url, "migrate", PIPELINE_RETENTION_RAW_DAYS="7")
    assert done.returncode == 0, done.stderr
    assert "database schema is up to date" in done.stdout
    assert "readings: kept 7 days, partitions by day" in done.stdout
    oldest = f"readings_p{_MIDNIGHT - timedelta(days=30):%Y%m%d}"
    assert f"partition {oldest}: dropped" in done.stdout
    assert (
        _partitions(database, "readings")[0] == f"readings_p{_MIDNIGHT - timedelta(days=7):%Y%m%d}"
    )
    assert _query(database, "SELECT level, keep_days FROM data_retention ORDER BY level") == [
        ("10min", None),
        ("minute", 400),
        ("raw", 7),
    ]

    again = _pipeline(database.writer_url, "maintain")
    assert again.returncode == 0, again.stderr
    assert "partitions are up to date" in again.stdout
    reader = _pipeline(database.reader_url, "maintain")
    assert reader.returncode == 1
    assert "the database refused: permission denied for function maintain_partitions" in (
        reader.stderr
    )

    bad = _pipeline(database.owner_url, "migrate", PIPELINE_RETENTION_MINUTE_DAYS="5")
    assert bad.returncode == 2
    assert "PIPELINE_RETENTION_RAW_DAYS=7 keeps raw data longer than" in bad.stderr
    assert "PIPELINE_RETENTION_MINUTE_DAYS=5" in bad.stderr
    assert _query(database, "SELECT keep_days FROM data_retention WHERE level = 'minute'") == [
        (400,)
    ]


def test_a_partition_a_long_query_holds_is_left_for_the_next_run(database: Database) -> None:
    """Maintenance never waits more than its 2 s lock timeout (inserts would queue behind it)."""
    apply_policy(database.owner_url, RetentionPolicy(raw_days=2, minute_days=400))
    oldest = _partitions(database, "readings")[0]
    engine = make_engine(database.writer_url)
    try:
        with psycopg.connect(database.reader_url) as reader:
            reader.execute(
                "SELECT count(*) FROM readings WHERE ts < %s", (_MIDNIGHT - timedelta(days=29),)
            )
            began = time.monotonic()
            with engine.connect() as conn:
                first = maintain(conn)
            waited = time.monotonic() - began
            reader.rollback()
        with engine.connect() as conn:
            second = maintain(conn)
    finally:
        engine.dispose()
    assert [(a.partition, a.action) for a in first] == [(oldest, "busy, left for the next call")]
    assert waited < 10
    assert [a.action for a in second] == ["dropped"] * 28
    assert (
        _partitions(database, "readings")[0] == f"readings_p{_MIDNIGHT - timedelta(days=2):%Y%m%d}"
    )
