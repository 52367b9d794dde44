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
    assert "pi-a" in table
    assert " 29 " in table
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


def test_writer_cannot_tamper_with_summary_tables_beyond_upserts(database: Database) -> None:
    with psycopg.connect(database.writer_url, autocommit=True) as conn:
        for forbidden in (
            "DELETE FROM readings_minute",
            "TRUNCATE readings_minute",
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
