"""The outbox's schema versions: a file written before ``pressure_hpa`` opens, drains, recovers."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from edge_agent.outbox import SCHEMA_VERSION, Outbox
from tempmon_contract.wire import reading_payload

# The schema of the outbox files on the Pis before version 2, as that agent created it.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    sensor         TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    ts             REAL,
    wall           REAL    NOT NULL,
    boot_id        TEXT    NOT NULL,
    boottime       REAL    NOT NULL,
    uncertain      INTEGER NOT NULL DEFAULT 0,
    temperature_c  REAL    NOT NULL,
    humidity_pct   REAL
);
CREATE INDEX IF NOT EXISTS outbox_held ON outbox (seq) WHERE ts IS NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""
NOW = 1_780_000_000.0


def old_outbox(path: Path, rows: int = 5) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', 1000)")
        conn.executemany(
            "INSERT INTO outbox (sensor, kind, ts, wall, boot_id, boottime, temperature_c,"
            " humidity_pct) VALUES (?, ?, ?, ?, 'boot-1', ?, ?, ?)",
            [("porch", "dht22", NOW + n, NOW + n, 100.0 + n, 20.0 + n, 50.0) for n in range(rows)],
        )
        conn.execute("INSERT INTO meta (key, value) VALUES ('dropped_total', 7)")


def columns(path: Path) -> tuple[int, list[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = [row[1] for row in conn.execute("PRAGMA table_info(outbox)")]
    return int(version), names


def test_a_new_outbox_has_the_current_schema(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.sqlite").close()
    version, names = columns(tmp_path / "o.sqlite")
    assert version == SCHEMA_VERSION == 2
    assert names[-2:] == ["humidity_pct", "pressure_hpa"]


def test_an_old_outbox_is_migrated_keeps_its_readings_and_drains(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    old_outbox(path)
    assert columns(path) == (0, columns(path)[1])
    assert "pressure_hpa" not in columns(path)[1]
    with Outbox(path) as box:
        assert columns(path) == (SCHEMA_VERSION, columns(path)[1])
        assert "pressure_hpa" in columns(path)[1]
        assert box.depth() == 5
        assert box.dropped_total() == 7
        pending = box.pending(0, 100)
        assert [p.seq for p in pending] == [1001, 1002, 1003, 1004, 1005]
        assert all(p.pressure_hpa is None for p in pending)
        payloads = [
            json.loads(
                reading_payload(
                    node="pi",
                    sensor=p.sensor,
                    kind=p.kind,
                    seq=p.seq,
                    ts=p.ts,
                    temperature_c=p.temperature_c,
                    humidity_pct=p.humidity_pct,
                    pressure_hpa=p.pressure_hpa,
                )
            )
            for p in pending
        ]
        assert "pressure_hpa" not in payloads[0]
        assert payloads[0]["humidity_pct"] == 50.0
        # New readings carry pressure, and continue the old file's numbers.
        seq = box.add(
            sensor="weather",
            kind="bme280",
            temperature_c=21.0,
            humidity_pct=40.0,
            pressure_hpa=1001.5,
            wall=NOW + 10,
            boot_id="boot-2",
            boottime=1.0,
            synced=True,
        )
        assert seq == 1006
        assert box.pending(1005, 10)[0].pressure_hpa == 1001.5
        assert box.delete([p.seq for p in box.pending(0, 100)]) == 6
        assert box.depth() == 0
    with Outbox(path) as box:  # opening it again changes nothing
        assert columns(path)[0] == SCHEMA_VERSION
        assert box.depth() == 0


def test_two_opens_of_an_old_outbox_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    old_outbox(path)
    with Outbox(path), Outbox(path, recover=False) as second:
        assert second.depth() == 5
    assert columns(path)[1].count("pressure_hpa") == 1


def test_a_damaged_old_outbox_is_salvaged_with_its_readings(tmp_path: Path) -> None:
    """The salvage reads a version 1 file too: a Pi upgraded with a damaged card loses nothing
    that can be read."""
    path = tmp_path / "o.sqlite"
    old_outbox(path, rows=50)
    path.with_name("o.sqlite.needs-recovery").write_text("test: marked damaged\n")
    with Outbox(path) as box:
        assert box.recovery is not None
        assert box.recovery.salvaged == 50
        assert box.depth() == 50
        assert [p.temperature_c for p in box.pending(0, 2)] == [20.0, 21.0]
        assert box.pending(0, 1)[0].pressure_hpa is None
    assert columns(path)[0] == SCHEMA_VERSION
