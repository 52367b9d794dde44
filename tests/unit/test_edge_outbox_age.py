"""The outbox drops readings by their real age, never by what a wrong wall clock made of it.

A Pi without a real-time clock boots with the time saved at its last shutdown. A reading taken
then is held until NTP synchronises and its time is corrected from CLOCK_BOOTTIME; its
``wall`` column keeps the wrong time it was taken with. Ageing by ``wall`` deleted such a
reading as too old right after its time was corrected (issue 13, item 1).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.agent import Agent, Backoff
from edge_agent.config import AgentConfig, OutboxConfig, SensorConfig
from edge_agent.outbox import Outbox
from tests.unit.edge.fake_clock import FakeClock
from tests.unit.edge.fake_mqtt import FakeBroker

DAY = 86400.0
MAX_AGE = 30 * DAY


def _add(
    box: Outbox,
    *,
    wall: float,
    boot: str = "boot-1",
    boottime: float = 100.0,
    synced: bool = True,
) -> int:
    return box.add(
        sensor="t1",
        kind="simulated",
        temperature_c=21.5,
        humidity_pct=None,
        wall=wall,
        boot_id=boot,
        boottime=boottime,
        synced=synced,
    )


def _seqs(box: Outbox) -> set[int]:
    conn = sqlite3.connect(box.path)
    try:
        return {row[0] for row in conn.execute("SELECT seq FROM outbox")}
    finally:
        conn.close()


def _run_until(agent: Agent, what: str, done: Callable[[], bool], within_s: float = 5) -> None:
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s} s"
        agent.step(0.005)


def test_a_reading_taken_with_a_lagging_clock_is_kept_after_its_time_is_corrected(
    tmp_path: Path,
) -> None:
    """The issue's case: a clock 40 days behind, a 30-day limit, NTP syncs, housekeeping runs."""
    real_now = time.time()
    clock = FakeClock(synced=False, wall=real_now - 40 * DAY, boottime=1_000.0)
    broker = FakeBroker()
    with Outbox(tmp_path / "o.sqlite", max_age_s=MAX_AGE) as box:
        seq = _add(box, wall=clock.wall(), boottime=clock.boottime(), synced=clock.synchronized())
        assert box.held() == 1
        config = AgentConfig(
            node_id="pi-lag",
            outbox=OutboxConfig(path=box.path, max_age_days=MAX_AGE / DAY),
            sensors=(SensorConfig(id="t1", kind="simulated"),),
            heartbeat_s=3600,
        )
        agent = Agent(
            config,
            sensors=[],
            clock=clock,
            outbox=box,
            client_factory=broker.client,  # type: ignore[arg-type]  # the fake's duck type
            backoff=Backoff(initial=0.02, cap=0.2),
        )
        clock.synced, clock.now, clock.since_boot = True, real_now, 1_010.0  # NTP, 10 s later
        _run_until(agent, "the corrected reading sent and acknowledged", lambda: box.depth() == 0)
        assert broker.stored == [seq]
        assert box.dropped_total() == 0
        agent.shutdown()


def test_this_boots_readings_are_aged_by_boottime_whatever_the_wall_clock_says(
    tmp_path: Path,
) -> None:
    now = 1_800_000_000.0
    with Outbox(tmp_path / "o.sqlite", max_age_s=MAX_AGE) as box:
        # Taken 31 days ago by CLOCK_BOOTTIME, with a wall clock that said "now": too old.
        old = _add(box, wall=now, boottime=100.0)
        # Taken a day ago, with a wall clock 20 years behind (and held, then flagged): fresh.
        fresh = _add(box, wall=now - 20 * 365 * DAY, boottime=100.0 + 30 * DAY, synced=False)
        held_old = _add(box, wall=now, boottime=50.0, synced=False)
        for synced in (False, True):
            box.enforce_bounds(now, synced=synced, boot_id="boot-1", boottime=100.0 + 31 * DAY)
        assert _seqs(box) == {fresh}
        assert {old, held_old}.isdisjoint(_seqs(box))
        assert box.dropped_total() == 2


def test_an_earlier_boots_readings_are_aged_by_their_time_only_while_the_clock_is_synced(
    tmp_path: Path,
) -> None:
    now = 1_800_000_000.0
    with Outbox(tmp_path / "o.sqlite", max_age_s=MAX_AGE) as box:
        old = _add(box, wall=now - 31 * DAY, boot="boot-0")
        fresh = _add(box, wall=now - 29 * DAY, boot="boot-0")
        # An unsynchronised clock (here: far ahead) must not age anything by wall time.
        assert box.enforce_bounds(
            now + 10 * 365 * DAY, synced=False, boot_id="boot-1", boottime=5.0
        ) == (0, 0)
        assert _seqs(box) == {old, fresh}
        assert box.enforce_bounds(now, synced=True, boot_id="boot-1", boottime=5.0) == (1, 0)
        assert _seqs(box) == {fresh}
        assert box.dropped_total() == 1


def test_an_earlier_boots_readings_of_uncertain_time_are_never_dropped_for_age(
    tmp_path: Path,
) -> None:
    now = 1_800_000_000.0
    with Outbox(tmp_path / "o.sqlite", max_rows=100, max_age_s=MAX_AGE) as box:
        # Held in boot-0 with a wall clock 20 years behind, then flagged time_uncertain.
        flagged = _add(box, wall=now - 20 * 365 * DAY, boot="boot-0", synced=False)
        box.resolve_held(synced=False, now_wall=now, boot_id="boot-1", boottime=5.0, hold_max_s=60)
        [row] = box.pending(0, 10)
        assert row.uncertain
        # Still held from boot-0 (never released yet): no knowable age either.
        held = _add(box, wall=now - 20 * 365 * DAY, boot="boot-0", synced=False)
        for synced in (False, True):
            assert box.enforce_bounds(now, synced=synced, boot_id="boot-1", boottime=5.0) == (0, 0)
        assert _seqs(box) == {flagged, held}
        # max_rows still bounds them: the oldest go first.
        newer = [_add(box, wall=now, boot="boot-1", boottime=5.0) for _ in range(100)]
        assert box.enforce_bounds(now, synced=True, boot_id="boot-1", boottime=5.0) == (0, 2)
        assert _seqs(box) == set(newer)
        assert box.dropped_total() == 2


@pytest.mark.parametrize("synced", [True, False])
def test_bounds_by_rows_and_age_are_both_counted(tmp_path: Path, synced: bool) -> None:
    with Outbox(tmp_path / "o.sqlite", max_rows=100, max_age_s=3600) as box:
        now = time.time()
        old = [_add(box, wall=now, boottime=0.0) for _ in range(5)]
        fresh = [_add(box, wall=now, boottime=7200.0) for _ in range(120)]
        assert box.enforce_bounds(now, synced=synced, boot_id="boot-1", boottime=7200.0) == (
            5,
            20,
        )
        remaining = [p.seq for p in box.pending(0, 1000)]
        assert remaining == fresh[20:]
        assert not set(old) & set(remaining)
        assert box.dropped_total() == 25
