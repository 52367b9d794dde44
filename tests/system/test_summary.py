"""The rollup and the summary views, written through the real Store into the real database."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pipeline.db import make_engine
from pipeline.decode import NodeStatus, Reading
from pipeline.store import Store
from tests.conftest import Database

pytestmark = pytest.mark.system

_RAW = """
SELECT node, sensor, max(kind), count(*), avg(temperature_c), min(temperature_c),
       max(temperature_c), avg(humidity_pct), min(humidity_pct), max(humidity_pct),
       min(ts), max(ts)
  FROM readings
 WHERE ts > now() - interval '1 hour' AND ts <= now()
 GROUP BY node, sensor ORDER BY node, sensor
"""
_VIEW = """
SELECT node, sensor, kind, readings, avg_c, min_c, max_c, avg_humidity_pct, min_humidity_pct,
       max_humidity_pct, first_ts, last_ts
  FROM sensor_summary_last_hour ORDER BY node, sensor
"""


def _reading(node: str, sensor: str, seq: int, ts: datetime, rng: random.Random) -> Reading:
    humid = sensor.startswith("h")
    return Reading(
        node=node,
        sensor=sensor,
        kind="dht22" if humid else "ds18b20",
        seq=seq,
        ts=ts,
        temperature_c=round(rng.uniform(-10, 40), 3),
        humidity_pct=round(rng.uniform(0, 100), 2) if humid else None,
        time_uncertain=False,
    )


def _dataset(now: datetime, rng: random.Random) -> list[Reading]:
    """Readings over the last 70 minutes, dense around both edges of the one-hour window."""
    out: list[Reading] = []
    seq = 0
    for node in ("pi-a", "pi-b"):
        for sensor in ("t1", "t2", "h1"):
            times = [now - timedelta(seconds=s) for s in range(5, 70 * 60, 17)]
            edge = now - timedelta(hours=1)
            times += [edge + timedelta(milliseconds=ms) for ms in range(-90_000, 90_000, 250)]
            times += [now - timedelta(milliseconds=ms) for ms in range(0, 120_000, 300)]
            times += [now + timedelta(seconds=s) for s in (1, 30, 200)]  # a fast node clock
            for ts in times:
                seq += 1
                out.append(_reading(node, sensor, seq, ts, rng))
    return out


def test_view_equals_the_plain_aggregate_over_raw_rows(database: Database) -> None:
    rng = random.Random(7)
    readings = _dataset(datetime.now(UTC), rng)
    rng.shuffle(readings)
    engine = make_engine(database.writer_url)
    store = Store(engine)
    batches = [readings[i : i + 700] for i in range(0, len(readings), 700)]
    for batch in batches:
        store.write(batch)
    # Redelivery of a third of the batches must not count twice in the rollup.
    for batch in batches[::3]:
        result = store.write(batch)
        assert result.inserted == 0
        assert result.duplicates == len(batch)
    engine.dispose()
    with psycopg.connect(database.reader_url) as conn:  # one transaction: one now()
        view = conn.execute(_VIEW).fetchall()
        raw = conn.execute(_RAW).fetchall()
    assert len(view) == 6
    assert [r[:4] for r in view] == [r[:4] for r in raw]
    for v, r in zip(view, raw, strict=True):
        assert v[4] == pytest.approx(r[4], rel=1e-12)  # sums in another order
        assert v[5:7] == r[5:7]
        if r[7] is None:
            assert v[7:10] == (None, None, None)
        else:
            assert v[7] == pytest.approx(r[7], rel=1e-12)
            assert v[8:10] == r[8:10]
        assert v[10:] == r[10:]


_RAW_BETWEEN = """
SELECT node, sensor, max(kind), count(*), min(temperature_c), max(temperature_c),
       min(humidity_pct), max(humidity_pct), min(ts), max(ts), sum(temperature_c),
       sum(humidity_pct)
  FROM readings
 WHERE ts > %(t0)s AND ts <= %(t1)s
 GROUP BY node, sensor ORDER BY node, sensor
"""
_FUNCTION_BETWEEN = """
SELECT node, sensor, kind, readings, min_c, max_c, min_humidity_pct, max_humidity_pct,
       first_ts, last_ts, avg_c, avg_humidity_pct, exact
  FROM sensor_summary(%(t0)s, %(t1)s) ORDER BY node, sensor
"""


def test_summary_function_is_exact_for_any_window(database: Database) -> None:
    """Windows of every length and alignment against ten-minute buckets, minutes and seconds.

    The view only ever sees now(); the function behind it takes any (t0, t1], so the bucket,
    minute and raw-edge arithmetic is checked here at boundaries the clock may never hit.
    """
    rng = random.Random(11)
    # Yesterday noon: inside the raw retention, where the function promises to be exact.
    base = (datetime.now(UTC) - timedelta(days=1)).replace(
        hour=12, minute=0, second=0, microsecond=0
    )
    readings: list[Reading] = []
    seq = 0
    for sensor in ("t1", "h1"):
        # Every 7 s for three hours, plus readings exactly on minute and bucket boundaries.
        times = [base + timedelta(seconds=s) for s in range(0, 3 * 3600, 7)]
        times += [base + timedelta(minutes=m) for m in range(180)]
        times += [base + timedelta(minutes=m, microseconds=1) for m in range(0, 180, 10)]
        for ts in times:
            seq += 1
            readings.append(_reading("pi-w", sensor, seq, ts, rng))
    rng.shuffle(readings)
    store = Store(make_engine(database.writer_url))
    stored = sum(store.write(readings[i : i + 900]).inserted for i in range(0, len(readings), 900))
    assert stored == len(readings)
    windows = [
        (timedelta(minutes=start_s / 60), timedelta(seconds=length_s))
        for start_s in (0, 1, 59, 60, 61, 540, 599, 600, 601, 1234.5, 3599, 3600)
        for length_s in (0, 0.5, 30, 60, 61, 599, 600, 601, 3540, 3600, 3661, 7200)
    ]
    windows += [
        (timedelta(seconds=rng.uniform(-600, 3 * 3600)), timedelta(seconds=rng.uniform(0, 9000)))
        for _ in range(60)
    ]
    windows.append((timedelta(minutes=30), timedelta(minutes=-5)))  # t1 before t0: empty
    with psycopg.connect(database.reader_url) as conn:
        for offset, length in windows:
            t0 = base + offset
            params = {"t0": t0, "t1": t0 + length}
            raw = conn.execute(_RAW_BETWEEN, params).fetchall()
            got = conn.execute(_FUNCTION_BETWEEN, params).fetchall()
            assert [g[:10] for g in got] == [r[:10] for r in raw], params
            assert all(g[12] is True for g in got), params
            for g, r in zip(got, raw, strict=True):
                assert g[10] == pytest.approx(r[10] / r[3], rel=1e-12), params
                if r[11] is None:
                    assert g[11] is None
                else:
                    assert g[11] == pytest.approx(r[11] / r[3], rel=1e-12), params


def test_ten_minute_buckets_sum_the_minutes(database: Database) -> None:
    rng = random.Random(5)
    now = datetime.now(UTC)
    readings = [
        _reading(f"pi-{n % 2}", ("t1", "h1")[n % 2], n, now - timedelta(seconds=n * 3), rng)
        for n in range(3000)
    ]
    store = Store(make_engine(database.writer_url))
    for i in range(0, 3000, 400):
        store.write(readings[i : i + 400])
        store.write(readings[i : i + 200])  # redelivered: counted once
    with psycopg.connect(database.reader_url) as conn:
        minutes = conn.execute(
            "SELECT node, sensor, date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01Z'),"
            "       sum(n), sum(sum_c), min(min_c), max(max_c), sum(n_h), sum(sum_h),"
            "       min(min_h), max(max_h), min(first_ts), max(last_ts)"
            "  FROM readings_minute GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ).fetchall()
        buckets = conn.execute(
            "SELECT node, sensor, bucket, n, sum_c, min_c, max_c, n_h, sum_h, min_h, max_h,"
            "       first_ts, last_ts FROM readings_10min ORDER BY 1, 2, 3"
        ).fetchall()
    assert sum(b[3] for b in buckets) == 3000
    assert len(buckets) == len(minutes)
    for b, m in zip(buckets, minutes, strict=True):
        assert b[:4] == m[:4]
        assert b[4] == pytest.approx(m[4], rel=1e-12)
        assert b[5:8] == m[5:8]
        assert (b[8] is None) == (m[8] is None)
        assert b[9:] == m[9:]


def test_concurrent_writers_do_not_deadlock_on_rollup_rows(database: Database) -> None:
    now = datetime.now(UTC)
    rng = random.Random(3)
    readings = [
        _reading(f"pi-{n % 3}", f"t{n % 4}", n, now - timedelta(seconds=n % 300), rng)
        for n in range(12_000)
    ]
    engine = make_engine(database.writer_url, pool_size=4)
    store = Store(engine)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        mine = readings[:]
        random.Random(seed).shuffle(mine)  # every worker writes everything, in its own order
        try:
            for i in range(0, len(mine), 500):
                store.write(mine[i : i + 500])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.dispose()
    assert errors == []
    with psycopg.connect(database.owner_url) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (12_000,)
        assert conn.execute("SELECT sum(n) FROM readings_minute").fetchone() == (12_000,)


def test_sensor_latest_shows_newest_reading_and_node_state(database: Database) -> None:
    now = datetime.now(UTC)
    rng = random.Random(1)
    store = Store(make_engine(database.writer_url))
    newest = _reading("pi-a", "t1", 10, now - timedelta(seconds=5), rng)
    store.write([newest, _reading("pi-a", "t1", 9, now - timedelta(seconds=50), rng)])
    store.write([_reading("pi-a", "t1", 8, now - timedelta(seconds=90), rng)])  # late, older
    store.write([], [NodeStatus("pi-a", "online", None, "0.1.0", 12.0, 0, 0, {"t1": 0})])
    with psycopg.connect(database.reader_url) as conn:
        row = conn.execute(
            "SELECT node, sensor, seq, temperature_c, node_state, agent_version FROM sensor_latest"
        ).fetchone()
    assert row == ("pi-a", "t1", 10, newest.temperature_c, "online", "0.1.0")


def test_summary_cli_prints_table_and_json(database: Database) -> None:
    now = datetime.now(UTC)
    rng = random.Random(2)
    Store(make_engine(database.writer_url)).write(
        [_reading("pi-a", "h1", n, now - timedelta(minutes=n), rng) for n in range(1, 30)]
        + [
            Reading(
                "pi-b",
                "hall",
                "bme280",
                n,
                now - timedelta(minutes=n),
                21.0,
                40.0,
                False,
                pressure_hpa=1000.0 + n,
            )
            for n in range(1, 4)
        ]
    )
    env = {**os.environ, "DATABASE_URL": database.reader_url}
    table = subprocess.run(
        [sys.executable, "-m", "pipeline", "summary"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert table.splitlines()[0].split()[:4] == ["node", "sensor", "kind", "n"]
    assert "avg hPa" in table.splitlines()[0]
    assert "pi-a" in table
    assert " 29 " in table
    (hall,) = [line for line in table.splitlines() if line.startswith("pi-b")]
    assert "1002.0" in hall.split()  # the mean of 1001, 1002 and 1003 hPa
    rows = json.loads(
        subprocess.run(
            [sys.executable, "-m", "pipeline", "summary", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    assert rows[0]["readings"] == 29
    assert rows[0]["kind"] == "dht22"
    assert rows[0]["avg_humidity_pct"] is not None
    assert rows[0]["avg_pressure_hpa"] is None
    assert (rows[1]["kind"], rows[1]["readings"]) == ("bme280", 3)
    assert (rows[1]["min_pressure_hpa"], rows[1]["max_pressure_hpa"]) == (1001.0, 1003.0)


def test_writer_cannot_tamper_with_summary_tables_beyond_upserts(database: Database) -> None:
    with psycopg.connect(database.writer_url, autocommit=True) as conn:
        for forbidden in (
            "DELETE FROM readings_minute",
            "TRUNCATE readings_minute",
            "DELETE FROM readings_10min",
            "TRUNCATE readings_10min",
            "DELETE FROM nodes",
            "DROP VIEW sensor_summary_last_hour",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
    with psycopg.connect(database.reader_url, autocommit=True) as conn:
        conn.execute("SELECT * FROM sensor_summary_last_hour")
        conn.execute("SELECT * FROM sensor_latest")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE nodes SET state = 'offline'")


# --- Air pressure (the BME280): rolled up and summarised like humidity --------------------------

_RAW_PRESSURE = """
SELECT node, sensor, max(kind), count(*), count(pressure_hpa), sum(pressure_hpa),
       min(pressure_hpa), max(pressure_hpa)
  FROM readings
 WHERE ts > %(t0)s AND ts <= %(t1)s
 GROUP BY node, sensor ORDER BY node, sensor
"""
_FUNCTION_PRESSURE = """
SELECT node, sensor, kind, readings, avg_pressure_hpa, min_pressure_hpa, max_pressure_hpa, exact
  FROM sensor_summary(%(t0)s, %(t1)s) ORDER BY node, sensor
"""


def _weather(sensor: str, seq: int, ts: datetime, rng: random.Random) -> Reading:
    """b1: a BME280 with pressure; b2: a BME280 that sometimes sent none; h1: a DHT22."""
    kind = "dht22" if sensor == "h1" else "bme280"
    pressure = (
        None if sensor == "h1" or (sensor == "b2" and seq % 3 == 0) else rng.uniform(950, 1050)
    )
    return Reading(
        node="pi-p",
        sensor=sensor,
        kind=kind,
        seq=seq,
        ts=ts,
        temperature_c=round(rng.uniform(-10, 40), 4),
        humidity_pct=round(rng.uniform(0, 100), 3),
        time_uncertain=False,
        pressure_hpa=None if pressure is None else round(pressure, 3),
    )


def test_pressure_is_rolled_up_and_summarised_for_any_window(database: Database) -> None:
    rng = random.Random(17)
    base = (datetime.now(UTC) - timedelta(days=1)).replace(
        hour=12, minute=0, second=0, microsecond=0
    )
    readings: list[Reading] = []
    seq = 0
    for sensor in ("b1", "b2", "h1"):
        for s in range(0, 3 * 3600, 11):
            seq += 1
            readings.append(_weather(sensor, seq, base + timedelta(seconds=s), rng))
    rng.shuffle(readings)
    engine = make_engine(database.writer_url)
    store = Store(engine)
    batches = [readings[i : i + 800] for i in range(0, len(readings), 800)]
    assert sum(store.write(batch).inserted for batch in batches) == len(readings)
    for batch in batches[::2]:  # redelivered: counted once
        assert store.write(batch).duplicates == len(batch)
    engine.dispose()
    windows = [
        (timedelta(minutes=start_m), timedelta(seconds=length_s))
        for start_m in (0, 0.5, 1, 9.75, 10, 61.2)
        for length_s in (0.5, 59, 60, 601, 3600, 7000)
    ]
    with psycopg.connect(database.reader_url) as conn:
        for offset, length in windows:
            params = {"t0": base + offset, "t1": base + offset + length}
            raw = conn.execute(_RAW_PRESSURE, params).fetchall()
            got = conn.execute(_FUNCTION_PRESSURE, params).fetchall()
            assert [g[:4] for g in got] == [r[:4] for r in raw], params
            for g, r in zip(got, raw, strict=True):
                assert g[7] is True
                if r[4] == 0:  # the DHT22, or a BME280 whose readings here had none
                    assert g[4:7] == (None, None, None), params
                else:
                    assert g[4] == pytest.approx(r[5] / r[4], rel=1e-12), params
                    assert g[5:7] == r[6:8], params
            assert {g[1] for g in got if g[4] is not None} <= {"b1", "b2"}
        # The ten-minute buckets hold the minutes' pressure exactly.
        minutes = conn.execute(
            "SELECT sensor, date_bin('10 minutes', minute, TIMESTAMPTZ '2000-01-01Z'),"
            "       sum(n_p), sum(sum_p), min(min_p), max(max_p)"
            "  FROM readings_minute GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        buckets = conn.execute(
            "SELECT sensor, bucket, n_p, sum_p, min_p, max_p FROM readings_10min ORDER BY 1, 2"
        ).fetchall()
        totals = conn.execute(
            "SELECT sensor, sum(n_p) FROM readings_minute GROUP BY 1 ORDER BY 1"
        ).fetchall()
    expected = {
        s: sum(1 for r in readings if r.sensor == s and r.pressure_hpa is not None)
        for s in ("b1", "b2", "h1")
    }
    assert totals == sorted(expected.items())
    assert 0 < expected["b2"] < expected["b1"]
    assert expected["h1"] == 0
    assert len(buckets) == len(minutes)
    for b, m in zip(buckets, minutes, strict=True):
        assert b[:3] == m[:3]
        assert b[3] == pytest.approx(m[3], rel=1e-12) if m[3] is not None else b[3] is None
        assert b[4:] == m[4:]


def test_the_last_hour_and_the_latest_reading_show_pressure(database: Database) -> None:
    now = datetime.now(UTC)
    rng = random.Random(23)
    readings = [
        _weather(sensor, n, now - timedelta(seconds=10 * n + 5), rng)
        for n in range(1, 60)
        for sensor in ("b1", "h1")
    ]
    readings = [r._replace(seq=i) for i, r in enumerate(readings)]
    store = Store(make_engine(database.writer_url))
    assert store.write(readings).inserted == len(readings)
    b1 = [r.pressure_hpa for r in readings if r.sensor == "b1"]
    newest = max((r for r in readings if r.sensor == "b1"), key=lambda r: r.ts)
    with psycopg.connect(database.reader_url) as conn:
        rows = conn.execute(
            "SELECT sensor, kind, readings, avg_pressure_hpa, min_pressure_hpa, max_pressure_hpa"
            " FROM sensor_summary_last_hour ORDER BY sensor"
        ).fetchall()
        latest = conn.execute(
            "SELECT sensor, pressure_hpa FROM sensor_latest ORDER BY sensor"
        ).fetchall()
    assert [r[:3] for r in rows] == [("b1", "bme280", 59), ("h1", "dht22", 59)]
    values = [p for p in b1 if p is not None]
    assert rows[0][3] == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert rows[0][4:] == (min(values), max(values))
    assert rows[1][3:] == (None, None, None)
    assert latest == [("b1", newest.pressure_hpa), ("h1", None)]
