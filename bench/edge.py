"""Edge agent footprint and outbox drain, next to a bare paho-mqtt loop, in one run.

    .venv/bin/python -m bench.edge [--backlog 100000] [--seconds 20]

Against a private RabbitMQ (the test harness, configured by gateway/):

  footprint     `edge-agent run` with three simulated sensors, each read every 10 ms for
                ``--seconds``: resident memory (peak, VmHWM) and CPU time per reading
  outbox write  Outbox.add() of one reading, SQLite WAL + synchronous=FULL (an fsync each)
  drain         an outbox holding ``--backlog`` readings (an outage), drained by the agent
                with no rate limit until empty
  baseline      a bare paho-mqtt loop publishing the same number of QoS 1 messages, 100 in
                flight, until every PUBACK arrived

Targets: under 40 MB resident; drain at no less than half the bare loop's rate.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.outbox import Outbox
from tempmon_contract.wire import reading_payload
from tests.harness import NodeCredentials, RabbitBroker
from tests.harness.agent_proc import write_config


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak resident kB) of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return cpu, hwm


def outbox_depth(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def start_agent(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "--log-level",
            "WARNING",
            "run",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def footprint(broker: RabbitBroker, creds: NodeCredentials, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), broker, creds, interval_s=0.01, drain_rate=10_000)
        agent = start_agent(config)
        time.sleep(2)  # start-up (imports) is not per-reading cost
        cpu0, _ = proc_stats(agent.pid)
        sent0 = broker.depth("readings")
        time.sleep(seconds)
        cpu1, hwm = proc_stats(agent.pid)
        sent1 = broker.depth("readings")
        agent.terminate()
        agent.wait(30)
    readings = max(1, sent1 - sent0)
    broker.purge("readings", "node-status")
    return {
        "rss_mb": hwm / 1024,
        "cpu_us_per_reading": 1e6 * (cpu1 - cpu0) / readings,
        "readings": readings,
    }


def outbox_write_rate(n: int = 2000) -> float:
    with tempfile.TemporaryDirectory() as tmp, Outbox(Path(tmp) / "o.sqlite") as box:
        began = time.perf_counter()
        for _ in range(n):
            box.add(
                sensor="s",
                kind="simulated",
                temperature_c=20.0,
                humidity_pct=None,
                wall=time.time(),
                boot_id="b",
                boottime=time.monotonic(),
                synced=True,
            )
        return n / (time.perf_counter() - began)


def drain(broker: RabbitBroker, creds: NodeCredentials, backlog: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), broker, creds, interval_s=3600, drain_rate=100_000)
        path = Path(tmp) / "outbox.sqlite"
        Outbox(path).close()  # create the schema
        now = time.time()
        conn = sqlite3.connect(path)
        with conn:
            conn.executemany(
                "INSERT INTO outbox (sensor, kind, ts, wall, boot_id, boottime, temperature_c)"
                " VALUES ('sim-1', 'simulated', ?, ?, 'b', 1.0, 20.5)",
                [(now - 60 + i / 1000, now) for i in range(backlog)],
            )
        conn.close()
        agent = start_agent(config)
        began = time.perf_counter()
        while outbox_depth(path) > 0:
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited with {agent.returncode}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - began
        agent.terminate()
        agent.wait(30)
    broker.purge("readings", "node-status")
    return backlog / elapsed


def bare_paho(broker: RabbitBroker, creds: NodeCredentials, n: int) -> float:
    acked = threading.Event()
    window = threading.Semaphore(1000)  # message ids are 16-bit: bound what is outstanding
    count = 0

    def on_publish(*_args: object) -> None:
        nonlocal count
        count += 1
        window.release()
        if count >= n:
            acked.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=creds.username, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(creds.username, creds.password)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", broker.mqtt_port)
    client.loop_start()
    payload = reading_payload(
        node=creds.username,
        sensor="sim-1",
        kind="simulated",
        seq=1,
        ts=time.time(),
        temperature_c=20.5,
    )
    began = time.perf_counter()
    for _ in range(n):
        window.acquire()
        client.publish(f"sensors/{creds.username}/sim-1", payload, qos=1)
    acked.wait(600)
    elapsed = time.perf_counter() - began
    client.disconnect()
    client.loop_stop()
    broker.purge("readings")
    return n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with RabbitBroker() as broker:
        creds = broker.add_node("bench-node")
        print("footprint ...", flush=True)
        fp = footprint(broker, creds, args.seconds)
        print("outbox write rate ...", flush=True)
        write_rate = outbox_write_rate()
        print(f"drain of {args.backlog} ...", flush=True)
        drained = drain(broker, creds, args.backlog)
        print(f"bare paho loop, {args.backlog} ...", flush=True)
        bare = bare_paho(broker, creds, args.backlog)
    print(f"\nEdge agent, simulator mode, three sensors ({os.cpu_count()} cores)")
    print(f"  resident memory (peak)      {fp['rss_mb']:8.1f} MB   target < 40 MB")
    print(
        f"  CPU time per reading        {fp['cpu_us_per_reading']:8.0f} us   "
        f"({fp['readings']:.0f} readings in {args.seconds:.0f} s)"
    )
    print(f"  outbox write (fsync each)   {write_rate:8.0f} readings/s")
    print(f"  drain after a backlog       {drained:8.0f} readings/s")
    print(f"  bare paho QoS 1 loop        {bare:8.0f} messages/s")
    print(f"  drain / bare loop           {drained / bare:8.0%}      target >= 50 %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
