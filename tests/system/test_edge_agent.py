"""The edge agent against the real broker: outages, kills, the Last Will, a damaged outbox."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Database
from tests.harness import RabbitBroker
from tests.harness.agent_proc import AgentProcess, outbox_state, write_config
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import wait_for

pytestmark = pytest.mark.system


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for n, agent in enumerate(started):
        if agent.alive():
            agent.kill()
        print(f"--- agent {n} log ---\n{agent.log[-4000:]}")


def _arrived(rabbit: RabbitBroker) -> list[int]:
    return [json.loads(body)["seq"] for _, _, body in rabbit.drain("readings")]


def _first_seq(rabbit: RabbitBroker) -> int:
    return min(_arrived(rabbit))


def test_simulator_publishes_readings_that_arrive(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    creds = rabbit.add_node("pi-sim")
    agent = AgentProcess(write_config(tmp_path, rabbit, creds))
    agents.append(agent)
    wait_for("300 readings queued", lambda: rabbit.depth("readings") >= 300, 60, interval=0.5)
    assert agent.terminate() == 0
    depth, top = outbox_state(tmp_path / "outbox.sqlite")
    assert depth == 0, "SIGTERM flushes the outbox while the broker is up"
    time.sleep(1.5)  # quorum queue counts lag
    seqs = _arrived(rabbit)
    print(f"arrived={len(seqs)} distinct={len(set(seqs))} top={top}")
    assert set(seqs) == set(range(min(seqs), top + 1)), "a sequence number went missing"
    statuses = [json.loads(body) for _, _, body in rabbit.drain("node-status")]
    assert statuses[0]["state"] == "online"
    assert statuses[-1]["state"] == "offline"  # published on SIGTERM
    heartbeat = next(s for s in statuses if "outbox_depth" in s)
    assert heartbeat["read_errors"] == {"sim-1": 0, "sim-2": 0, "sim-3": 0}
    assert "agent stopped" in agent.log


@pytest.mark.slow
def test_broker_outage_then_every_sequence_number_arrives(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    creds = rabbit.add_node("pi-outage")
    agent = AgentProcess(write_config(tmp_path, rabbit, creds, interval_s=0.02))
    agents.append(agent)
    wait_for("readings flowing", lambda: rabbit.depth("readings") >= 100, 60, interval=0.5)
    rabbit.stop()
    time.sleep(6)  # the agent keeps sampling into its outbox
    buffered, _ = outbox_state(tmp_path / "outbox.sqlite")
    assert buffered > 200, f"only {buffered} readings buffered during the outage"
    rabbit.start()
    wait_for(
        "outbox drained",
        lambda: outbox_state(tmp_path / "outbox.sqlite")[0] < 20,
        120,
        interval=0.5,
    )
    assert agent.terminate() == 0
    _, top = outbox_state(tmp_path / "outbox.sqlite")
    time.sleep(1.5)
    seqs = _arrived(rabbit)
    print(f"buffered={buffered} arrived={len(seqs)} distinct={len(set(seqs))} top={top}")
    assert set(seqs) == set(range(min(seqs), top + 1))
    assert "broker unreachable" in agent.log or "disconnected" in agent.log


@pytest.mark.slow
def test_agent_killed_while_broker_down_keeps_its_buffer(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    creds = rabbit.add_node("pi-powercut")
    config = write_config(tmp_path, rabbit, creds, interval_s=0.02)
    first = AgentProcess(config)
    agents.append(first)
    wait_for("readings flowing", lambda: rabbit.depth("readings") >= 50, 60, interval=0.5)
    rabbit.stop()
    time.sleep(4)
    first.kill()  # a power cut while offline
    buffered, top_at_kill = outbox_state(tmp_path / "outbox.sqlite")
    assert buffered > 100
    rabbit.start()
    second = AgentProcess(config)
    agents.append(second)
    wait_for(
        "buffer drained",
        lambda: outbox_state(tmp_path / "outbox.sqlite")[0] < 20,
        120,
        interval=0.5,
    )
    assert second.terminate() == 0
    _, top = outbox_state(tmp_path / "outbox.sqlite")
    time.sleep(1.5)
    seqs = set(_arrived(rabbit))
    assert set(range(min(seqs), top + 1)) <= seqs
    assert top > top_at_kill  # the second run continued the sequence, never reused it


def test_last_will_says_offline_after_kill(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    creds = rabbit.add_node("pi-will")
    agent = AgentProcess(write_config(tmp_path, rabbit, creds, interval_s=1))
    agents.append(agent)
    wait_for("online status", lambda: rabbit.depth("node-status") >= 1, 60, interval=0.5)
    agent.kill()
    seen: list[dict[str, object]] = []

    def offline_arrived() -> bool:
        seen.extend(json.loads(b) for _, _, b in rabbit.drain("node-status"))
        return any(s.get("state") == "offline" for s in seen)

    wait_for("Last Will", offline_arrived, 30, interval=0.5)
    # The Last Will names the connection it belongs to: the one the online status came from.
    [will] = [s for s in seen if s["state"] == "offline"]
    assert set(will) == {"version", "node", "state", "session"}
    assert {s.get("session") for s in seen} == {will["session"]}


def test_max_inflight_one_publishes_every_reading(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """A window of one: readings one at a time, statuses queued by paho behind them."""
    creds = rabbit.add_node("pi-window")
    config = write_config(tmp_path, rabbit, creds)
    # write_config's `extra` lands after the [[sensors]] tables, and TOML cannot reopen
    # [mqtt] there: put the key into the [mqtt] table itself.
    config.write_text(config.read_text().replace("[mqtt]\n", "[mqtt]\nmax_inflight = 1\n", 1))
    agent = AgentProcess(config)
    agents.append(agent)
    wait_for("100 readings queued", lambda: rabbit.depth("readings") >= 100, 60, interval=0.5)
    assert agent.terminate() == 0
    depth, top = outbox_state(tmp_path / "outbox.sqlite")
    assert depth == 0, "SIGTERM flushes the outbox while the broker is up"
    time.sleep(1.5)  # quorum queue counts lag
    seqs = _arrived(rabbit)
    assert set(seqs) == set(range(min(seqs), top + 1)), "a sequence number went missing"
    statuses = [json.loads(body) for _, _, body in rabbit.drain("node-status")]
    assert statuses[0]["state"] == "online"
    assert any("outbox_depth" in s for s in statuses), "no heartbeat got through"
    assert statuses[-1]["state"] == "offline"


def _prefilled_outbox(path: Path, rows: int) -> int:
    """An outbox of ``rows`` readings waiting to be sent; return its sequence counter."""
    from edge_agent.outbox import Outbox  # noqa: PLC0415

    Outbox(path).close()
    conn = sqlite3.connect(path)
    try:
        with conn:
            (seed,) = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"
            ).fetchone()
            now = time.time()
            conn.executemany(
                "INSERT INTO outbox (seq, sensor, kind, ts, wall, boot_id, boottime,"
                " temperature_c) VALUES (?, 'sim-1', 'simulated', ?, ?, 'old-boot', 1.0, 21.5)",
                ((seed + n, now - rows + n, now - rows + n) for n in range(1, rows + 1)),
            )
    finally:
        conn.close()
    return int(seed) + rows


def test_a_damaged_outbox_stops_the_agent_and_the_next_start_recovers_it(
    rabbit: RabbitBroker, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """A worn SD card: exit code 75, offline announced; systemd's restart recovers the file."""
    import random  # noqa: PLC0415

    creds = rabbit.add_node("pi-worn")
    # A slow drain keeps the backlog (and the damaged pages) in the outbox.
    config = write_config(tmp_path, rabbit, creds, interval_s=0.1, sensors=1, drain_rate=5)
    outbox = tmp_path / "outbox.sqlite"
    top_before = _prefilled_outbox(outbox, 20_000)
    first = AgentProcess(config)
    agents.append(first)
    wait_for("a heartbeat", lambda: rabbit.depth("node-status") >= 2, 60, interval=0.5)
    pages = outbox.stat().st_size // 4096
    with outbox.open("r+b") as f:  # garbage over pages in the middle, as a failing card leaves
        f.seek(pages // 2 * 4096)
        f.write(random.Random(7).randbytes(5 * 4096))
    wait_for("the agent to stop", lambda: not first.alive(), 30, interval=0.2)
    assert first.proc.returncode == 75, first.log[-3000:]
    assert "ERROR edge_agent.agent outbox damaged" in first.log
    assert "database disk image is malformed" in first.log
    time.sleep(1.5)
    statuses = [json.loads(body) for _, _, body in rabbit.drain("node-status")]
    assert statuses[-1]["state"] == "offline", "the clean shutdown announces offline"
    assert statuses[-1]["session"] == statuses[0]["session"]
    rabbit.drain("readings")

    # systemd starts it again (Restart=always): the damaged file is kept, the rest recovered.
    second = AgentProcess(config)
    agents.append(second)
    wait_for("the recovery", lambda: "outbox recovered" in second.log, 60, interval=0.2)
    wait_for("readings flowing again", lambda: rabbit.depth("readings") >= 10, 60, interval=0.5)
    assert second.terminate() == 0
    kept = list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert any(k.name.endswith("Z") for k in kept), kept
    depth, top = outbox_state(tmp_path / "outbox.sqlite")
    assert depth > 15_000, "the readings on sound pages were salvaged"
    assert top > top_before, "the sequence goes on above the damaged file's numbers"


@pytest.mark.slow
def test_chain_agent_broker_pipeline_database(
    rabbit: RabbitBroker, database: Database, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """Every reading the agent took is a row, once: the whole chain with real processes."""
    import psycopg  # noqa: PLC0415

    creds = rabbit.add_node("pi-chain")
    consumer = ConsumerProcess(rabbit, database.writer_url)
    try:
        agent = AgentProcess(write_config(tmp_path, rabbit, creds, interval_s=0.02))
        agents.append(agent)

        def rows() -> tuple[int, int, int]:
            with psycopg.connect(database.owner_url) as conn:
                got = conn.execute(
                    "SELECT count(*), min(seq), max(seq) FROM readings WHERE node = 'pi-chain'"
                ).fetchone()
            assert got is not None
            return int(got[0]), int(got[1] or 0), int(got[2] or 0)

        # Readings flowing through the whole chain (150 a second), rather than a fixed 8 s.
        wait_for("500 readings stored", lambda: rows()[0] >= 500, 60, interval=0.2)
        assert agent.terminate() == 0
        _, top = outbox_state(tmp_path / "outbox.sqlite")
        wait_for("every reading stored", lambda: rows()[2] == top, 60, interval=0.5)
        count, low, high = rows()
        print(f"rows={count} seq={low}..{high}")
        assert count == high - low + 1
        with psycopg.connect(database.owner_url) as conn:
            node = conn.execute("SELECT state FROM nodes WHERE node = 'pi-chain'").fetchone()
        wait_for("node offline", lambda: node == ("offline",) or _state(database) == "offline", 30)
    finally:
        consumer.terminate()
        consumer.close()


def _state(database: Database) -> str | None:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(database.owner_url) as conn:
        row = conn.execute("SELECT state FROM nodes WHERE node = 'pi-chain'").fetchone()
    return None if row is None else str(row[0])


class _FakeClock:
    """The kernel's view of the clock, faked at the lowest layer: a Pi after a power cut."""

    def __init__(self) -> None:
        self.synced = False
        self.offset = -20 * 365 * 86400.0  # the wall clock is twenty years behind

    def synchronized(self) -> bool:
        return self.synced

    def wall(self) -> float:
        return time.time() + (0.0 if self.synced else self.offset)

    def boottime(self) -> float:
        return time.monotonic()

    def boot_id(self) -> str:
        return "this-boot"


def test_readings_wait_for_the_clock_and_arrive_with_corrected_times(
    rabbit: RabbitBroker, tmp_path: Path
) -> None:
    import threading  # noqa: PLC0415
    from datetime import datetime  # noqa: PLC0415

    from edge_agent.agent import Agent  # noqa: PLC0415
    from edge_agent.config import load_config  # noqa: PLC0415
    from edge_agent.outbox import Outbox  # noqa: PLC0415

    creds = rabbit.add_node("pi-noclock")
    config_path = write_config(tmp_path, rabbit, creds, interval_s=0.1, sensors=1)
    config_path.write_text(config_path.read_text().replace("require_sync = false", ""))
    config = load_config(config_path, {})
    clock = _FakeClock()
    agent = Agent(config, clock=clock)
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    taken_from = time.time()
    runner.start()
    try:
        time.sleep(3)
        with Outbox(config.outbox.path) as box:
            held = box.held()
        assert held >= 10
        time.sleep(1.5)
        assert rabbit.depth("readings") == 0, "a reading with a known-wrong time was sent"
        clock.synced = True
        wait_for("held readings sent", lambda: rabbit.depth("readings") >= held, 30)
    finally:
        stop.set()
        runner.join(30)
    taken_to = time.time()
    arrived = [json.loads(b) for _, _, b in rabbit.drain("readings")]
    times = [datetime.fromisoformat(r["ts"]).timestamp() for r in arrived]
    assert times
    assert all(taken_from - 1 <= t <= taken_to + 1 for t in times), "times were not corrected"
    # Every reading, held or not, arrived: none was stranded behind newer ones.
    depth, top = outbox_state(tmp_path / "outbox.sqlite")
    seqs = {r["seq"] for r in arrived}
    assert depth == 0
    assert seqs == set(range(min(seqs), top + 1))


BME280_SENSOR = """
[[sensors]]
id = "weather"
kind = "bme280"
address = "0x76"
interval_s = 0.2
offset_c = -0.5
"""


def _fake_bme280_board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents started from now on find, on PYTHONPATH, a Blinka `board` whose I2C bus is a fake
    BME280 at 0x76 reading 23.5 °C, 61.25 % and 987.5 hPa (edge_agent.sensors.fakes)."""
    board = tmp_path / "fake-board"
    board.mkdir()
    (board / "board.py").write_text(
        '"""Blinka\'s board, for this test: its I2C bus is a fake BME280."""\n'
        "from edge_agent.sensors.fakes import board_i2c as I2C  # noqa: F401, N812\n"
    )
    path = [str(board), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.setenv("EDGE_FAKE_BME280", "23.5,61.25,987.5")
    monkeypatch.setenv("EDGE_FAKE_BME280_ADDRESS", "0x76")


def test_a_bme280_on_a_fake_i2c_bus_publishes_pressure(
    rabbit: RabbitBroker,
    tmp_path: Path,
    agents: list[AgentProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real `edge-agent run` with a bme280: the real adafruit_bme280 library reads a fake
    I2C bus (Blinka's `board` on PYTHONPATH replaced by one whose `I2C()` is the fake chip),
    and the readings arrive with pressure, valid by the schema and by the pipeline's decoder."""
    pytest.importorskip("adafruit_bme280")
    from datetime import UTC, datetime  # noqa: PLC0415

    from jsonschema import Draft202012Validator  # noqa: PLC0415

    from pipeline.decode import decode_reading  # noqa: PLC0415

    _fake_bme280_board(tmp_path, monkeypatch)
    creds = rabbit.add_node("pi-bme")
    config = write_config(tmp_path / "agent", rabbit, creds, sensors=0, extra=BME280_SENSOR)
    agent = AgentProcess(config)
    agents.append(agent)
    wait_for("bme280 readings queued", lambda: rabbit.depth("readings") >= 5, 60, interval=0.5)
    assert agent.terminate() == 0
    time.sleep(1.5)  # quorum queue counts lag
    deliveries = rabbit.drain("readings")
    schema_path = Path(__file__).parents[2] / "gateway" / "schema" / "reading.v1.schema.json"
    validator = Draft202012Validator(json.loads(schema_path.read_text()))
    assert len(deliveries) >= 5
    for method, _, body in deliveries:
        reading = json.loads(body)
        validator.validate(reading)
        assert (reading["node"], reading["sensor"], reading["kind"]) == (
            "pi-bme",
            "weather",
            "bme280",
        )
        assert reading["temperature_c"] == pytest.approx(23.0, abs=0.01)  # the offset applied
        assert reading["humidity_pct"] == pytest.approx(61.25, abs=0.05)
        assert reading["pressure_hpa"] == pytest.approx(987.5, abs=0.01)
        decoded = decode_reading(body, method.routing_key, now=datetime.now(UTC))
        assert decoded.kind == "bme280"
        assert decoded.pressure_hpa == reading["pressure_hpa"]
        assert decoded.humidity_pct == reading["humidity_pct"]
    statuses = [json.loads(body) for _, _, body in rabbit.drain("node-status")]
    heartbeat = next(s for s in statuses if "read_errors" in s)
    assert heartbeat["read_errors"] == {"weather": 0}


def test_a_bme280_reading_goes_through_the_whole_chain_into_the_summary(
    rabbit: RabbitBroker,
    database: Database,
    tmp_path: Path,
    agents: list[AgentProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The new kind end to end with real processes: a real agent reading a BME280 on a fake
    I2C bus, the broker, `pipeline consume`, PostgreSQL; every reading stored once, with its
    pressure, and `sensor_summary` giving the pressure's mean, min and max."""
    pytest.importorskip("adafruit_bme280")
    import psycopg  # noqa: PLC0415

    _fake_bme280_board(tmp_path, monkeypatch)
    creds = rabbit.add_node("pi-bme-chain")
    consumer = ConsumerProcess(rabbit, database.writer_url)
    try:
        config = write_config(tmp_path / "agent", rabbit, creds, sensors=0, extra=BME280_SENSOR)
        agent = AgentProcess(config)
        agents.append(agent)

        def stored() -> int:
            with psycopg.connect(database.owner_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM readings WHERE node = 'pi-bme-chain'"
                ).fetchone()
            return int(row[0]) if row else 0

        wait_for("bme280 readings stored", lambda: stored() >= 10, 60, interval=0.2)
        assert agent.terminate() == 0
        _, top = outbox_state(tmp_path / "agent" / "outbox.sqlite")
        with psycopg.connect(database.owner_url) as conn:

            def newest() -> int:
                row = conn.execute(
                    "SELECT coalesce(max(seq), 0) FROM readings WHERE node = 'pi-bme-chain'"
                ).fetchone()
                return int(row[0]) if row else 0

            wait_for("every reading stored", lambda: newest() == top, 60, interval=0.5)
            rows = conn.execute(
                "SELECT kind, count(*), count(DISTINCT seq), min(pressure_hpa), max(pressure_hpa),"
                " min(humidity_pct), max(temperature_c)"
                " FROM readings WHERE node = 'pi-bme-chain' GROUP BY kind"
            ).fetchall()
            summary = conn.execute(
                "SELECT kind, readings, avg_pressure_hpa, min_pressure_hpa, max_pressure_hpa,"
                " avg_humidity_pct FROM sensor_summary(now() - interval '1 hour', now())"
                " WHERE node = 'pi-bme-chain'"
            ).fetchall()
    finally:
        consumer.terminate()
        consumer.close()
    ((kind, count, distinct, p_min, p_max, h_min, t_max),) = rows
    assert kind == "bme280"
    assert count == distinct >= 10
    assert p_min == p_max == pytest.approx(987.5, abs=0.01)
    assert h_min == pytest.approx(61.25, abs=0.05)
    assert t_max == pytest.approx(23.0, abs=0.01)  # the -0.5 offset
    ((s_kind, readings, avg_p, min_p, max_p, avg_h),) = summary
    assert (s_kind, readings) == ("bme280", count)
    assert (min_p, max_p) == (p_min, p_max)
    assert avg_p == pytest.approx(987.5, abs=0.01)
    assert avg_h == pytest.approx(61.25, abs=0.05)
