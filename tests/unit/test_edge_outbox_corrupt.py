"""A damaged outbox is loud, stops the agent for a restart, and is recovered at that start.

A worn SD card (or a power cut with a write cache that lied) leaves pages of the outbox
unreadable: SQLite says "database disk image is malformed". That error is a
``sqlite3.DatabaseError`` but not an ``OperationalError``, so it escaped the outbox's error
handling and ended a sampler thread for good while the heartbeats went on saying ``online``
(issue 13, item 4). These tests damage real outbox files the way a card does: pages in the
middle of the file overwritten with garbage.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from edge_agent.agent import Agent, Backoff, _Counters, _Sampler
from edge_agent.cli import main
from edge_agent.clock import KernelClock
from edge_agent.config import AgentConfig, MqttConfig, OutboxConfig, SensorConfig
from edge_agent.outbox import RANDOM_SEED_RANGE, Outbox, OutboxCorrupt
from edge_agent.sensors import Sample, Simulated
from tests.unit.edge.agents import sequence_counter
from tests.unit.edge.fake_mqtt import FakeBroker

PAGE = 4096  # SQLite's default page size, which the outbox uses
ROWS = 20_000  # about 250 pages: the damage lands in the middle, between readable pages
MALFORMED = "database disk image is malformed"
KEPT = re.compile(r"o\.sqlite\.corrupt-\d{8}T\d{6}Z")
Row = tuple[object, ...]


# -- a real outbox, damaged like an SD card damages it ---------------------------------------


def _fill(path: Path, rows: int = ROWS) -> dict[int, Row]:
    """A closed outbox of ``rows`` varied readings and some meta; its rows by seq.

    The outbox makes the file, its sequence and its meta; the rows go in through SQL in one
    transaction (20,000 transactions with a sync each would take seconds).
    """
    with Outbox(path) as box:
        box.client_token()
        box.count_dropped(7)
        box.count_puback_timeout(3, now_wall=1_800_000_000.0)
        first = box.add(
            sensor="s0",
            kind="ds18b20",
            temperature_c=20.0,
            humidity_pct=None,
            wall=1_800_000_000.0,
            boot_id="boot-1",
            boottime=100.0,
            synced=True,
        )
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO outbox (seq, sensor, kind, ts, wall, boot_id, boottime, uncertain,"
            " temperature_c, humidity_pct) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    first + n,
                    f"s{n % 3}",
                    "dht22" if n % 3 == 2 else "ds18b20",
                    1_800_000_000.0 + n - (0 if n % 5 else 7.25),  # corrected held readings
                    1_800_000_000.0 + n,
                    "boot-1",
                    100.0 + n,
                    1 if n % 7 == 0 else 0,
                    20 + n % 70 / 10,
                    40.5 + n % 10 if n % 3 == 2 else None,
                )
                for n in range(1, rows)
            ),
        )
    conn.close()
    return _rows(path)


def _rows(path: Path) -> dict[int, Row]:
    conn = sqlite3.connect(path)
    try:
        return {
            r[0]: tuple(r)
            for r in conn.execute(
                "SELECT seq, sensor, kind, ts, wall, boot_id, boottime, uncertain,"
                " temperature_c, humidity_pct FROM outbox"
            )
        }
    finally:
        conn.close()


def _garble(path: Path, pages: Iterable[int], *, seed: int = 13) -> None:
    """Overwrite ``pages`` (0-based) with garbage."""
    rng = random.Random(seed)
    with path.open("r+b") as f:
        for page in pages:
            f.seek(page * PAGE)
            f.write(rng.randbytes(PAGE))
            f.flush()
            os.fsync(f.fileno())


def _garble_cells(path: Path, page: int, *, seed: int = 13) -> int:
    """Overwrite the second half of the cells of a leaf page, cell by cell; return how many.

    The page's header stays intact, so SQLite can still count its rows (``count(*)`` reads
    only the headers) but not read them: a torn write.
    """
    rng = random.Random(seed)
    with path.open("r+b") as f:
        f.seek(page * PAGE)
        data = bytearray(f.read(PAGE))
        assert data[0] == 0x0D, "a table leaf page"
        cells = int.from_bytes(data[3:5], "big")
        starts = [int.from_bytes(data[8 + 2 * i : 10 + 2 * i], "big") for i in range(cells)]
        ordered = [*sorted(starts), PAGE]
        ends = dict(itertools.pairwise(ordered))
        for start in starts[cells // 2 :]:
            data[start : ends[start]] = rng.randbytes(ends[start] - start)
        f.seek(page * PAGE)
        f.write(data)
        os.fsync(f.fileno())
    return cells - cells // 2


def _middle(path: Path, count: int = 5) -> range:
    pages = path.stat().st_size // PAGE
    return range(pages // 2, pages // 2 + count)


def _sqlite_says(path: Path, sql: str = "SELECT count(*) FROM outbox") -> str:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql).fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()
    return "ok"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- every damaged read or write is OutboxCorrupt ----------------------------------------------


def test_a_damaged_file_raises_outbox_corrupt_naming_the_file_and_the_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path)
    _garble(path, _middle(path))
    assert _sqlite_says(path) == MALFORMED
    with Outbox(path, recover=False) as box:
        for call in (
            box.depth,
            lambda: box.pending(0, ROWS),
            lambda: box.enforce_bounds(0, synced=True, boot_id="boot-1", boottime=1e9),
        ):
            with pytest.raises(OutboxCorrupt, match=MALFORMED) as caught:
                call()
            assert str(path) in str(caught.value)
    # The next start will recover it.
    assert MALFORMED in (tmp_path / "o.sqlite.needs-recovery").read_text()


def test_a_write_into_a_damaged_page_raises_outbox_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path)
    pages = path.stat().st_size // PAGE
    with Outbox(path) as box:
        _garble(path, range(pages - 3, pages))  # the last leaf, where the next row goes
        with pytest.raises(OutboxCorrupt, match=MALFORMED):
            box.add(
                sensor="s0",
                kind="ds18b20",
                temperature_c=20.0,
                humidity_pct=None,
                wall=time.time(),
                boot_id="boot-1",
                boottime=1.0,
                synced=True,
            )


def test_a_file_that_is_not_a_database_is_damaged_too(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(random.Random(1).randbytes(16 * PAGE))
    with pytest.raises(OutboxCorrupt, match="file is not a database"):
        Outbox(path, recover=False)


# -- the sampler never dies ----------------------------------------------------------------------


class _Counting:
    id = "probe"
    kind = "ds18b20"

    def __init__(self) -> None:
        self.calls = 0

    def read(self) -> Sample:
        self.calls += 1
        return Sample(21.5)

    def close(self) -> None:
        pass


def _sampler(box: Outbox, sensor: _Counting, stop: threading.Event) -> tuple[_Sampler, _Counters]:
    counters = _Counters(read_errors={sensor.id: 0})
    sampler = _Sampler(
        sensor,
        0.01,
        outbox=box,
        clock=KernelClock(assume_synced=True),
        counters=counters,
        lock=threading.Lock(),
        stop=stop,
    )
    return sampler, counters


def test_the_sampler_survives_a_damaged_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path)
    pages = path.stat().st_size // PAGE
    stop = threading.Event()
    sensor = _Counting()
    with Outbox(path) as box:
        _garble(path, range(pages - 3, pages))  # every insert now meets a damaged page
        sampler, counters = _sampler(box, sensor, stop)
        sampler.start()
        time.sleep(0.5)
        alive = sampler.is_alive()
        stop.set()
        sampler.join(5)
    assert alive, "the sampler thread died on the damaged outbox"
    assert sensor.calls >= 10, "the sensor stopped being read"
    assert counters.not_stored == sensor.calls, "every lost reading is counted"


class _Flaky(Outbox):
    """An outbox whose ``add`` fails unexpectedly the first few times (a bug, not a state)."""

    failures = 3

    def add(self, **reading: object) -> int:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            raise RuntimeError("an unexpected bug")
        return super().add(**reading)  # type: ignore[arg-type]


def test_the_sampler_survives_an_unexpected_exception_from_the_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stop = threading.Event()
    sensor = _Counting()
    with _Flaky(tmp_path / "o.sqlite") as box:
        sampler, counters = _sampler(box, sensor, stop)
        sampler.start()
        time.sleep(0.3)
        alive = sampler.is_alive()
        stop.set()
        sampler.join(5)
        stored = box.depth()
    assert alive, "the sampler thread died on an exception from outbox.add"
    assert counters.not_stored == 3
    assert stored == counters.readings >= 10
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "one log line per episode, with the traceback"
    assert errors[0].exc_info is not None
    assert "cannot store them in the outbox" in errors[0].getMessage()


# -- the agent stops for systemd to restart it ----------------------------------------------------


def test_a_running_agent_exits_with_75_on_a_damaged_outbox(tmp_path: Path) -> None:
    """`edge-agent run` as systemd runs it; no broker (it keeps sampling into the outbox).

    The damage lands where the sampler writes its next reading: the table's root page, the
    sequence counter and the last pages. The agent's own writes live in the write-ahead log
    until a checkpoint, so the test checkpoints first: then the next insert reads the
    damaged pages from the file.
    """
    path = tmp_path / "o.sqlite"
    _fill(path)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[node]\nid = "pi-worn"\n[mqtt]\nhost = "127.0.0.1"\nport = {_closed_port()}\n'
        f'[outbox]\npath = "{path}"\n[clock]\nrequire_sync = false\n'
        '[[sensors]]\nid = "sim-1"\nkind = "simulated"\ninterval_s = 0.05\n'
    )
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "agent started" not in log.read_text():
            assert agent.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # sampling into the outbox
        rc = None
        for attempt in range(5):  # the sampler may rewrite a page between checkpoint and damage
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            pages = path.stat().st_size // PAGE
            _garble(path, [1, 2, *range(pages - 3, pages)], seed=attempt)
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = agent.wait(3)
                break
        if rc is None:
            rc = agent.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent keeps running on a damaged outbox:\n{log.read_text()[-3000:]}")
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGKILL)
            agent.wait()
    text = log.read_text()
    assert rc == 75, text[-3000:]
    [line] = [line for line in text.splitlines() if "ERROR" in line and "outbox damaged" in line]
    assert str(path) in line
    assert MALFORMED in line
    assert "readings lost: cannot store them in the outbox sensor=sim-1" in text
    assert "agent stopped" in text
    assert (tmp_path / "o.sqlite.needs-recovery").exists(), "the next start recovers it"


def test_a_connected_agent_says_offline_and_stops_on_a_damaged_outbox(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path)
    broker = FakeBroker()
    config = AgentConfig(
        node_id="pi-worn",
        mqtt=MqttConfig(max_inflight=10),
        outbox=OutboxConfig(path=path, drain_rate_per_s=50),
        sensors=(SensorConfig(id="sim-1", kind="simulated", interval_s=0.02),),
        heartbeat_s=0.2,
        shutdown_flush_s=1,
    )
    agent = Agent(
        config,
        sensors=[Simulated("sim-1", seed=1)],
        clock=KernelClock(assume_synced=True),
        outbox=Outbox(path),
        client_factory=broker.client,  # type: ignore[arg-type]  # the fake's duck type
        backoff=Backoff(initial=0.02, cap=0.2),
    )
    stop = threading.Event()
    raised: list[BaseException] = []

    def run() -> None:
        try:
            agent.run(stop)
        except BaseException as exc:  # noqa: BLE001 - examined below
            raised.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while len(broker.statuses) < 2:  # online and a heartbeat
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _garble(path, _middle(path))
        runner.join(15)
        assert not runner.is_alive(), "the agent keeps running on a damaged outbox"
    finally:
        stop.set()
        runner.join(15)
    assert len(raised) == 1
    assert isinstance(raised[0], OutboxCorrupt)
    assert MALFORMED in str(raised[0])
    assert agent.outbox_corrupt is raised[0]
    assert all(not s.is_alive() for s in agent._samplers)
    [client] = broker.clients
    assert client.will is not None
    last = broker.statuses[-1][1]
    assert last["state"] == "offline", "the clean shutdown's offline"
    assert last["session"] == client.will[1]["session"]


# -- recovery at the next start ----------------------------------------------------------------


def test_recovery_keeps_the_damaged_file_and_salvages_every_readable_reading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.sqlite"
    before = _fill(path)
    counter = sequence_counter(path)
    with Outbox(path) as box:
        token = box.client_token()
    _garble(path, _middle(path))
    assert _sqlite_says(path) == MALFORMED
    damaged = path.read_bytes()

    caplog.set_level(logging.INFO, logger="edge_agent")
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        # The damaged file is kept, untouched, next to the new one.
        assert KEPT.fullmatch(recovery.kept.name)
        assert recovery.kept.parent == tmp_path
        assert recovery.kept.read_bytes() == damaged
        # Every reading that could be read is there, exactly as it was.
        after = _rows(path)
        assert len(after) == recovery.salvaged
        assert all(after[seq] == before[seq] for seq in after)
        lost = len(before) - len(after)
        assert 0 < lost <= 5 * 100, "only the readings on the damaged pages are lost"
        assert min(after) == min(before)
        assert max(after) == max(before), "the readings after the damage are saved too"
        # The damaged file could not count its rows: the loss is unknown, but bounded.
        assert recovery.lost is None
        assert recovery.lost_at_most is not None
        assert recovery.lost_at_most >= lost
        # Meta carried over; the recovery counted.
        assert box.client_token() == token
        assert box.puback_timeouts() == (1, 3)
        assert box.dropped_total() == 7 + recovery.dropped
        count, last = box.recoveries()
        assert count == 1
        assert last is not None
        assert recovery.kept.name in last
        # Sequence numbers go on above every number the damaged file handed out.
        assert recovery.next_seq == counter + 1
        new = box.add(
            sensor="s0",
            kind="ds18b20",
            temperature_c=20.0,
            humidity_pct=None,
            wall=time.time(),
            boot_id="boot-3",
            boottime=1.0,
            synced=True,
        )
        assert new == counter + 1
    assert not (tmp_path / "o.sqlite.needs-recovery").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    [done] = [e for e in errors if e.startswith("outbox recovered")]
    assert str(recovery.kept) in done
    assert f"salvaged={recovery.salvaged}" in done
    # The recovered file is sound, and it is not recovered again.
    assert _sqlite_says(path, "PRAGMA integrity_check") == "ok"
    with Outbox(path) as box:
        assert box.recovery is None
        assert box.recoveries()[0] == 1


def test_recovery_counts_the_lost_readings_when_the_damaged_file_can_count_them(
    tmp_path: Path,
) -> None:
    """Garbage in the cells of a page, its header intact: count(*) still works."""
    path = tmp_path / "o.sqlite"
    before = _fill(path)
    garbled = sum(_garble_cells(path, page) for page in _middle(path, 2))
    assert _sqlite_says(path) == "ok"
    assert _sqlite_says(path, "SELECT sum(temperature_c) FROM outbox") == MALFORMED
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        after = _rows(path)
        assert set(after) <= set(before)
        assert all(after[seq] == before[seq] for seq in after)
        assert recovery.lost == len(before) - len(after)
        assert 0 < recovery.lost <= garbled + 2 * 100
        assert recovery.dropped == recovery.lost
        assert box.dropped_total() == 7 + recovery.lost


def test_recovery_takes_the_write_ahead_log_along(tmp_path: Path) -> None:
    """A power cut leaves committed readings in the -wal file: they are salvaged too."""
    live, path = tmp_path / "live.sqlite", tmp_path / "o.sqlite"
    _fill(live)
    with Outbox(live) as box:
        tail = [
            box.add(
                sensor="s1",
                kind="ds18b20",
                temperature_c=22.0,
                humidity_pct=None,
                wall=time.time(),
                boot_id="boot-1",
                boottime=1.0,
                synced=True,
            )
            for _ in range(300)
        ]
        # The power cut: what is on the card now, the database and its log.
        path.write_bytes(live.read_bytes())
        Path(f"{path}-wal").write_bytes(Path(f"{live}-wal").read_bytes())
    assert Path(f"{path}-wal").stat().st_size > 0
    _garble(path, _middle(path))
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        assert Path(f"{recovery.kept}-wal").exists(), "the log is kept next to its database"
        assert set(tail) <= set(_rows(path)), "the readings only in the log were salvaged"
        assert recovery.next_seq == max(tail) + 1


def test_a_file_nothing_can_be_read_from_is_kept_and_a_new_outbox_seeded(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    garbage = random.Random(2).randbytes(64 * PAGE)
    path.write_bytes(garbage)
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        assert recovery.kept.read_bytes() == garbage
        assert recovery.salvaged == 0
        assert recovery.lost is None
        assert box.depth() == 0
        low, high = RANDOM_SEED_RANGE  # an unsynchronised clock: see test_edge_seq_seed.py
        assert low < recovery.next_seq <= high + 1
        assert box.recoveries()[0] == 1


def test_a_lost_counter_makes_the_sequence_start_far_above_what_was_seen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    before = _fill(path)
    conn = sqlite3.connect(path)
    [(root,)] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_sequence'")
    conn.close()
    _garble(path, range(root - 1, root))
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        assert recovery.salvaged == len(before)
        # Numbers above the highest row seen may have been sent and deleted already.
        assert recovery.next_seq > max(before) + 2**32


def test_the_previous_runs_finding_forces_a_recovery(tmp_path: Path) -> None:
    """The running agent met a damaged page that a quick check at start does not see."""
    path = tmp_path / "o.sqlite"
    before = _fill(path, 500)
    (tmp_path / "o.sqlite.needs-recovery").write_text(f"{MALFORMED} (SQLITE_CORRUPT)\n")
    with Outbox(path) as box:
        recovery = box.recovery
        assert recovery is not None
        assert MALFORMED in recovery.reason
        assert recovery.lost == 0
        assert _rows(path) == before
    assert not (tmp_path / "o.sqlite.needs-recovery").exists()


def test_a_recovery_cut_short_between_its_renames_is_completed(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    before = _fill(tmp_path / "o.sqlite.recovering", 100)
    (tmp_path / "o.sqlite.needs-recovery").write_text("damaged\n")
    with Outbox(path) as box:
        assert box.recovery is None
        assert box.depth() == 100
    assert _rows(path) == before
    assert not (tmp_path / "o.sqlite.recovering").exists()


def _status_config(tmp_path: Path, path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[node]\nid = "pi-worn"\n[outbox]\npath = "{path}"\n'
        '[[sensors]]\nid = "sim-1"\nkind = "simulated"\n'
    )
    return config


def test_status_shows_the_recoveries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "o.sqlite"
    _fill(path, 2_000)
    _garble(path, _middle(path, 2))
    Outbox(path).close()  # the agent's start recovers it
    config = _status_config(tmp_path, path)
    capsys.readouterr()
    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["outbox_recoveries"] == 1
    assert "damaged file kept as o.sqlite.corrupt-" in status["last_outbox_recovery"]
    assert main(["status", "--config", str(config)]) == 0
    assert "outbox_recoveries" in capsys.readouterr().out


def test_status_never_moves_a_damaged_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge-agent status` runs next to the agent: only the agent recovers its outbox."""
    path = tmp_path / "o.sqlite"
    _fill(path, 2_000)
    _garble(path, _middle(path, 2))
    config = _status_config(tmp_path, path)
    assert main(["status", "--config", str(config)]) == 1
    assert MALFORMED in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("o.sqlite*")) == [
        "o.sqlite",
        "o.sqlite.needs-recovery",
    ]
