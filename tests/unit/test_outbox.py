"""The outbox: durable, never reusing a sequence number, bounded, honest about the clock."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox


def _add(
    box: Outbox,
    *,
    synced: bool = True,
    wall: float | None = None,
    boot: str = "b1",
    boottime: float = 100.0,
    sensor: str = "t1",
) -> int:
    return box.add(
        sensor=sensor,
        kind="simulated",
        temperature_c=21.5,
        humidity_pct=None,
        wall=time.time() if wall is None else wall,
        boot_id=boot,
        boottime=boottime,
        synced=synced,
    )


def test_wal_and_full_sync(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        _add(box)
    conn = sqlite3.connect(tmp_path / "o.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_sequence_never_repeats_across_restarts_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as box:
        first = [_add(box) for _ in range(5)]
        box.delete(first)
    with Outbox(path) as box:
        second = [_add(box) for _ in range(5)]
    assert min(second) > max(first)
    assert first == sorted(first)
    # A new outbox starts at its creation time in microseconds, not at 1.
    assert first[0] > int((time.time() - 60) * 1_000_000)


def test_pending_oldest_first_and_delete_on_ack(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        seqs = [_add(box) for _ in range(10)]
        assert [p.seq for p in box.pending(0, 3)] == seqs[:3]
        assert [p.seq for p in box.pending(seqs[2], 100)] == seqs[3:]
        box.delete(seqs[:4])
        assert box.depth() == 6
        assert box.meta("last_puback_at") is not None


def test_bounded_by_rows_and_age(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=100, max_age_s=3600) as box:
        now = time.time()
        # Taken in an earlier boot, with a synchronised clock: aged by their time.
        old = [_add(box, wall=now - 7200, boot="b0") for _ in range(5)]
        fresh = [_add(box, wall=now) for _ in range(120)]
        assert box.enforce_bounds(now, synced=True, boot_id="b1", boottime=100.0) == (5, 20)
        remaining = [p.seq for p in box.pending(0, 1000)]
        assert remaining == fresh[20:]
        assert not set(old) & set(remaining)
        assert box.dropped_total() == 25


def test_held_readings_wait_for_the_clock_then_get_corrected_times(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        seq = _add(box, synced=False, wall=86_400.0, boottime=50.0)  # 1970: clock not set
        assert box.pending(0, 10) == []
        assert box.held() == 1
        box.resolve_held(
            synced=False, now_wall=90_000.0, boot_id="b1", boottime=60.0, hold_max_s=3600
        )
        assert box.pending(0, 10) == []
        real_now = 1_800_000_000.0
        corrected, flagged = box.resolve_held(
            synced=True, now_wall=real_now, boot_id="b1", boottime=170.0, hold_max_s=3600
        )
        assert (corrected, flagged) == (1, 0)
        [row] = box.pending(0, 10)
        assert row.seq == seq
        assert row.ts == pytest.approx(real_now - 120.0)
        assert not row.uncertain


def test_held_readings_are_flagged_when_sync_never_comes_or_after_reboot(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        _add(box, synced=False, wall=1_000.0, boot="old-boot", boottime=5.0)
        _add(box, synced=False, wall=2_000.0, boot="b2", boottime=10.0)
        corrected, flagged = box.resolve_held(
            synced=False, now_wall=3_000.0, boot_id="b2", boottime=20.0, hold_max_s=3600
        )
        assert (corrected, flagged) == (0, 1)  # the earlier boot's reading cannot be fixed
        corrected, flagged = box.resolve_held(
            synced=False, now_wall=9_000.0, boot_id="b2", boottime=3700.0, hold_max_s=3600
        )
        assert (corrected, flagged) == (0, 1)  # waited longer than hold_max_s
        rows = box.pending(0, 10)
        assert [(r.ts, r.uncertain) for r in rows] == [(1_000.0, True), (2_000.0, True)]


def test_concurrent_writers_and_a_drainer(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        errors: list[BaseException] = []

        def writer(sensor: str) -> None:
            try:
                for _ in range(200):
                    _add(box, sensor=sensor)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(f"s{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        drained = 0
        while any(t.is_alive() for t in threads) or box.depth():
            rows = box.pending(0, 50)
            drained += box.delete(r.seq for r in rows)
        for t in threads:
            t.join()
        assert errors == []
        assert drained == 600
