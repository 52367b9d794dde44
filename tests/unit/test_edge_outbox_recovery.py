"""The recovery of a damaged outbox, made safe against what a failing card does to it.

* A power cut can come between any two steps of a recovery (the renames of the damaged file,
  its write-ahead log, the new file, the marker): the next start finishes the job, loses no
  salvageable reading and never hands out a sequence number twice.
* A salvage that cannot finish (a full card) must not keep the agent from starting: the
  damaged file is moved aside, an empty outbox starts above its numbers, and the salvage is
  tried again at the next start. Only the newest damaged copies are kept.
* Readings lost on damaged pages, and readings the agent could not store while the file was
  damaged, are counted in ``dropped_total``.
* Only SQLite's corruption codes mean a damaged file; a constraint failure does not.
* The agent reports a damaged outbox wherever it meets it, and its shutdown never crashes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.clock import KernelClock
from edge_agent.config import AgentConfig, OutboxConfig, SensorConfig
from edge_agent.outbox import (
    RANDOM_SEED_RANGE,
    Outbox,
    OutboxCorrupt,
    OutboxError,
    _Salvage,
)
from edge_agent.sensors import Sample
from tests.unit.edge.agents import fake_agent, sequence_counter
from tests.unit.edge.fake_clock import FakeClock
from tests.unit.edge.fake_mqtt import FakeBroker
from tests.unit.test_edge_outbox_corrupt import (
    MALFORMED,
    PAGE,
    _fill,
    _garble,
    _middle,
    _rows,
)

Row = tuple[object, ...]
MARKER = "o.sqlite.needs-recovery"


def _add(box: Outbox, *, sensor: str = "s1") -> int:
    return box.add(
        sensor=sensor,
        kind="ds18b20",
        temperature_c=22.0,
        humidity_pct=None,
        wall=time.time(),
        boot_id="boot-2",
        boottime=1.0,
        synced=True,
    )


def _mark(directory: Path) -> None:
    """What the running agent leaves when it meets a damaged page."""
    (directory / MARKER).write_text(f"2030-01-01T00:00:00Z {MALFORMED} (SQLITE_CORRUPT)\n")


# -- a power cut at any step of a recovery ----------------------------------------------------


class _PowerCut(BaseException):
    """The power goes: nothing after this point happens (not even an ``except Exception``)."""


class _Cutter:
    """Counts the renames and removals under ``root``; the power goes before step ``at``."""

    def __init__(self, root: Path, at: int | None) -> None:
        self.root = str(root)
        self.at = at
        self.steps = 0

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            if any(
                isinstance(a, str | os.PathLike) and os.fspath(a).startswith(self.root)
                for a in args[:2]
            ):
                if self.steps == self.at:
                    raise _PowerCut
                self.steps += 1
            return real(*args, **kwargs)

        return step


def _start(path: Path, at: int | None, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Start the agent's outbox with the power going before step ``at``; True if it got through."""
    cutter = _Cutter(path.parent, at)
    with monkeypatch.context() as patch:
        for name in ("rename", "replace", "unlink", "remove"):
            patch.setattr(os, name, cutter.wrap(getattr(os, name)))
        try:
            Outbox(path).close()
        except _PowerCut:
            return False
    return True


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Row], int]:
    """The card at the power cut: 3000 readings checkpointed, 300 more only in the log.

    The oldest 250 were acknowledged (deleted); the previous run found the file damaged. The
    file alone (without its log) has a lower counter and lacks the newest readings.
    """
    root = tmp_path_factory.mktemp("card")
    live = root / "live" / "o.sqlite"
    live.parent.mkdir()
    _fill(live, 3000)
    snapshot = root / "snapshot"
    snapshot.mkdir()
    with Outbox(live) as box:
        box._conn().execute("PRAGMA wal_autocheckpoint=0")
        tail = [_add(box) for _ in range(300)]
        box.delete(sorted(_rows(live))[:250])
        expected = _rows(live)
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{live}{suffix}", snapshot / f"o.sqlite{suffix}")
    alone = root / "alone.sqlite"
    shutil.copyfile(snapshot / "o.sqlite", alone)
    assert sequence_counter(alone) < max(tail), "the log holds the newest numbers"
    _mark(snapshot)
    return snapshot, expected, max(tail)


def _check_after_the_cuts(run: Path, expected: dict[int, Row], top: int, what: str) -> None:
    path = run / "o.sqlite"
    Outbox(path).close()  # the next start: it finishes (or does) the recovery
    with Outbox(path) as box:
        assert box.recovery is None, f"{what}: recovered again"
        assert _rows(path) == expected, f"{what}: salvageable readings lost"
        assert sequence_counter(path) >= top, f"{what}: the counter went below a number handed out"
        assert _add(box) > top, f"{what}: a sequence number handed out again"
        assert box.recoveries()[0] == 1, f"{what}: one damaged file, one recovery"
        assert box.dropped_total() == 7, f"{what}: nothing was lost"
    assert _sqlite_ok(path)
    kept = [p for p in run.glob("o.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1, f"{what}: {sorted(p.name for p in run.iterdir())}"
    assert Path(f"{kept[0]}-wal").exists(), f"{what}: the damaged file's log is kept next to it"
    assert {p.name for p in run.glob("o.sqlite*")} <= {
        "o.sqlite",
        "o.sqlite-wal",
        "o.sqlite-shm",
        kept[0].name,
        f"{kept[0].name}-wal",
        f"{kept[0].name}-shm",
    }, f"{what}: leftovers"


def _sqlite_ok(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        return bool(conn.execute("PRAGMA integrity_check").fetchone() == ("ok",))
    finally:
        conn.close()


def test_a_power_cut_at_any_step_of_a_recovery_loses_nothing_and_reuses_no_number(
    card: tuple[Path, dict[int, Row], int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot, expected, top = card
    for at in range(100):
        run = tmp_path / f"cut-{at}"
        shutil.copytree(snapshot, run)
        done = _start(run / "o.sqlite", at, monkeypatch)
        _check_after_the_cuts(run, expected, top, f"power cut before step {at}")
        if done:
            break
    assert at >= 4, "a recovery has several steps"


def test_power_cuts_during_the_start_after_a_power_cut_lose_nothing_either(
    card: tuple[Path, dict[int, Row], int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot, expected, top = card
    for first in range(100):
        base = tmp_path / f"base-{first}"
        shutil.copytree(snapshot, base)
        if _start(base / "o.sqlite", first, monkeypatch):
            break
        for second in range(100):
            run = tmp_path / f"cut-{first}-{second}"
            shutil.copytree(base, run)
            done = _start(run / "o.sqlite", second, monkeypatch)
            _check_after_the_cuts(run, expected, top, f"cuts before steps {first}, {second}")
            if done:
                break


# -- a salvage that cannot finish ------------------------------------------------------------------


def _full_disk_while_salvaging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The card fills up while the salvage writes the new outbox."""
    real = _Salvage.rows

    def rows(self: _Salvage, sink: Callable[[list[Row]], object]) -> None:
        def full(chunk: list[Row]) -> object:
            sink(chunk[:10])
            raise sqlite3.OperationalError("database or disk is full")

        real(self, full)

    monkeypatch.setattr(_Salvage, "rows", rows)


def test_a_salvage_that_cannot_finish_still_starts_the_agent_and_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.sqlite"
    before = _fill(path, 2_000)
    counter = sequence_counter(path)
    _mark(tmp_path)
    caplog.set_level(logging.INFO, logger="edge_agent")
    _full_disk_while_salvaging(monkeypatch)
    config = AgentConfig(
        node_id="pi-full",
        outbox=OutboxConfig(path=path),
        sensors=(SensorConfig(id="t1", kind="simulated"),),
    )
    agent = Agent(config, sensors=[], clock=FakeClock(synced=False, wall=1_700_000_000.0))
    box = agent.outbox
    try:
        recovery = box.recovery
        assert recovery is not None
        assert recovery.pending, "the salvage is still to be done"
        assert (recovery.salvaged, recovery.lost) == (0, None)
        assert box.depth() == 0
        assert recovery.next_seq > counter, "numbered above the damaged file's numbers"
        assert _add(box) == recovery.next_seq
        assert box.dropped_total() == 7, "the meta table came along"
        assert recovery.kept.exists()
        assert not (tmp_path / MARKER).exists()
        assert not (tmp_path / "o.sqlite.recovering").exists()
        last = box.recoveries()[1]
        assert last is not None
        assert "tried again at the next start" in last
    finally:
        box.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("database or disk is full" in e and "tried again" in e for e in errors), errors

    monkeypatch.undo()  # room on the card again
    caplog.clear()
    with Outbox(path) as box:
        assert box.recovery is None
        rows = _rows(path)
        assert {seq: rows[seq] for seq in before} == before, "the salvage was done now"
        assert len(rows) == len(before) + 1
        assert box.dropped_total() == 7
        last = box.recoveries()[1]
        assert last is not None
        assert f"salvaged={len(before)}" in last
        assert _add(box) > recovery.next_seq
    assert any("salvage" in r.getMessage() for r in caplog.records)
    with Outbox(path) as box:  # done once only
        assert len(_rows(path)) == len(before) + 2
        assert box.dropped_total() == 7


def test_only_the_newest_three_damaged_copies_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path, 200)
    for stamp in ("20240101T000000Z", "20240101T000000Z-2", "20240101T000000Z-10"):
        for suffix in ("", "-wal"):
            (tmp_path / f"o.sqlite.corrupt-{stamp}{suffix}").write_bytes(b"old")
    (tmp_path / "o.sqlite.corrupt-20240301T000000Z").write_bytes(b"old")
    _mark(tmp_path)
    caplog.set_level(logging.INFO, logger="edge_agent")
    with Outbox(path) as box:
        assert box.recovery is not None
        kept = box.recovery.kept.name
    assert sorted(p.name for p in tmp_path.glob("o.sqlite.corrupt-*")) == sorted(
        [
            "o.sqlite.corrupt-20240101T000000Z-10",
            "o.sqlite.corrupt-20240101T000000Z-10-wal",
            "o.sqlite.corrupt-20240301T000000Z",
            kept,
            *(
                [f"{kept}-wal", f"{kept}-shm"]
                if (tmp_path / f"{kept}-wal").exists()
                else [f"{kept}-shm"]
                if (tmp_path / f"{kept}-shm").exists()
                else []
            ),
        ]
    )
    deleted = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert len(deleted) == 2, deleted
    assert all("newest 3" in d for d in deleted)


# -- what was lost is counted ---------------------------------------------------------------------


def test_each_damaged_stretch_counts_at_least_one_lost_reading(tmp_path: Path) -> None:
    """count(*) fails on a damaged leaf: the loss is a range, its lower bound is counted."""
    path = tmp_path / "o.sqlite"
    before = _fill(path)
    _garble(path, _middle(path))
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        lost = len(before) - len(_rows(path))
        assert recovery.lost is None
        assert recovery.lost_at_most is not None
        assert 1 <= recovery.dropped <= lost <= recovery.lost_at_most
        assert box.dropped_total() == 7 + recovery.dropped
        last = box.recoveries()[1]
        assert last is not None
        assert f"at least {recovery.dropped}, at most {recovery.lost_at_most}" in last


class _Probe:
    id = "probe"
    kind = "ds18b20"

    def read(self) -> Sample:
        return Sample(21.5)

    def close(self) -> None:
        pass


def test_readings_not_stored_while_the_outbox_is_damaged_are_counted_at_the_recovery(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path)
    pages = path.stat().st_size // PAGE
    box = Outbox(path)
    _garble(path, range(pages - 3, pages))  # every insert now meets a damaged page
    config = AgentConfig(
        node_id="pi-worn",
        outbox=OutboxConfig(path=path),
        sensors=(SensorConfig(id="probe", kind="simulated", interval_s=0.01),),
    )
    agent = Agent(
        config,
        sensors=[_Probe()],
        clock=KernelClock(assume_synced=True),
        outbox=box,
        client_factory=FakeBroker().client,  # type: ignore[arg-type]  # the fake's duck type
    )
    agent.start_sampling()
    deadline = time.monotonic() + 10
    while agent.counters.not_stored < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    agent.shutdown()
    assert agent.outbox_corrupt is not None
    not_stored = agent.counters.not_stored
    assert f"not_stored={not_stored}" in (tmp_path / MARKER).read_text()
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        assert recovery.not_stored == not_stored
        assert box.dropped_total() == 7 + recovery.dropped + not_stored
        last = box.recoveries()[1]
        assert last is not None
        assert f"not_stored={not_stored}" in last


# -- the agent meets a damaged outbox wherever it is ----------------------------------------------


class _DamagedCounts(Outbox):
    """An outbox whose PUBACK-timeout counters sit on a damaged page."""

    def count_puback_timeout(self, outstanding: int, *, now_wall: float | None = None) -> None:
        del outstanding, now_wall  # never written: the page is damaged
        raise OutboxCorrupt(f"the outbox {self.path} is damaged: {MALFORMED}")


def _agent(box: Outbox, broker: FakeBroker) -> Agent:
    return fake_agent(
        box, broker, node="pi-worn", max_inflight=10, puback_timeout_s=0.2, shutdown_flush_s=0.2
    )


def _steps_until(agent: Agent, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not done():
        assert time.monotonic() < deadline
        agent.step(0.005)


def test_a_damaged_outbox_met_on_a_puback_timeout_stops_the_agent(tmp_path: Path) -> None:
    broker = FakeBroker()
    broker.refusing = True
    with _DamagedCounts(tmp_path / "o.sqlite") as box:
        for _ in range(5):
            _add(box)
        agent = _agent(box, broker)
        agent._last_housekeeping = math.inf  # only the timeout itself saves the counters
        _steps_until(agent, lambda: agent.puback_timeouts == 1)
        assert isinstance(agent.outbox_corrupt, OutboxCorrupt)


def test_a_damaged_outbox_met_during_shutdown_is_reported(tmp_path: Path) -> None:
    with _DamagedCounts(tmp_path / "o.sqlite") as box:
        agent = _agent(box, FakeBroker())
        agent.mqtt_session._puback_timeouts_unsaved.append(3)
        agent.shutdown()
        assert isinstance(agent.outbox_corrupt, OutboxCorrupt)


def test_shutdown_survives_an_offline_status_that_cannot_be_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """paho 2.x: ``is_published()`` of a failed publish raises; the exit code stays 75."""
    broker = FakeBroker()
    caplog.set_level(logging.INFO, logger="edge_agent")
    with Outbox(tmp_path / "o.sqlite") as box:
        agent = _agent(box, broker)
        _steps_until(agent, lambda: agent.connected)
        broker.failing = True  # the socket just broke
        agent._outbox_corrupt(OutboxCorrupt(f"the outbox {box.path} is damaged: {MALFORMED}"))
        with pytest.raises(OutboxCorrupt):
            agent.run(threading.Event())
    assert "agent stopped" in caplog.text


# -- what is damage --------------------------------------------------------------------------------


def test_a_constraint_failure_does_not_mark_a_sound_file_damaged(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path) as box:
        with pytest.raises(OutboxError, match="NOT NULL") as caught:
            box.add(
                sensor=None,  # type: ignore[arg-type]  # a caller's bug
                kind="ds18b20",
                temperature_c=20.0,
                humidity_pct=None,
                wall=time.time(),
                boot_id="b",
                boottime=1.0,
                synced=True,
            )
        assert not isinstance(caught.value, OutboxCorrupt)
        assert _add(box) > 0
    assert not (tmp_path / MARKER).exists()
    with Outbox(path) as box:
        assert box.recovery is None


SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26


@pytest.mark.parametrize(
    ("kind", "code", "damaged"),
    [
        (sqlite3.DatabaseError, SQLITE_CORRUPT, True),
        (sqlite3.DatabaseError, SQLITE_NOTADB, True),
        (sqlite3.DatabaseError, SQLITE_CORRUPT | 1 << 8, True),  # SQLITE_CORRUPT_VTAB
        (sqlite3.DatabaseError, SQLITE_CORRUPT | 3 << 8, True),  # SQLITE_CORRUPT_INDEX
        (sqlite3.IntegrityError, 19 | 5 << 8, False),  # SQLITE_CONSTRAINT_NOTNULL
        (sqlite3.IntegrityError, 19 | 8 << 8, False),  # SQLITE_CONSTRAINT_UNIQUE
        (sqlite3.DataError, 18, False),  # SQLITE_TOOBIG
        (sqlite3.DatabaseError, 20, False),  # SQLITE_MISMATCH
        (sqlite3.DatabaseError, None, False),  # not from SQLite itself
    ],
)
def test_only_sqlite_corruption_codes_mean_a_damaged_file(
    tmp_path: Path, kind: type[sqlite3.DatabaseError], code: int | None, damaged: bool
) -> None:
    exc = kind("what SQLite said")
    if code is not None:
        exc.sqlite_errorcode = code
    with Outbox(tmp_path / "o.sqlite", recover=False) as box:
        error = box._error(exc)
    assert isinstance(error, OutboxError)
    assert isinstance(error, OutboxCorrupt) is damaged
    assert (tmp_path / MARKER).exists() is damaged


def test_a_lost_counter_high_in_the_random_range_still_starts_above_every_number_seen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path, 500)
    high = RANDOM_SEED_RANGE[1] + 1_000  # an unsynchronised seed near the top, and its readings
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO outbox (seq, sensor, kind, ts, wall, boot_id, boottime, uncertain,"
            " temperature_c, humidity_pct) VALUES (?, 's0', 'ds18b20', NULL, 1.8e9, 'boot-1',"
            " 1.0, 0, 20.0, NULL)",
            (high,),
        )
    [(root,)] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_sequence'")
    conn.close()
    _garble(path, range(root - 1, root))
    with Outbox(path, clock_synced=False) as box:
        recovery = box.recovery
        assert recovery is not None
        assert recovery.next_seq > high
        assert _add(box) > high
