"""Pipeline drain: N queued readings into PostgreSQL, next to its baselines, in one run.

    .venv/bin/python -m bench.drain [--readings 200000] [--course-readings 5000] [--hostile 0.1]
                                    [--prefetch 3000] [--runs ours1,hostile,hostile2,...]
                                    [--repeat 1] [--dead-queue quorum|classic]

Starts a private RabbitMQ and PostgreSQL (the test harness, configured by gateway/), queues
the readings, and measures, each on the same data:

  ours x1 / x2      `pipeline consume` (one, then two replicas): decode, validate, batch,
                    insert ON CONFLICT DO NOTHING, rollups, latest, one ack per batch;
                    timed from the moment a replica consumes (its start-up is printed)
  ours x1 hostile   one replica on the same readings with a share (--hostile, default 10 %)
                    of unusable messages mixed in, each dead-lettered with its reason; its
                    rate counts every message taken off the queue, stored or dead-lettered
  ours x2 hostile   the same with two replicas, as compose runs them (run "hostile2",
                    not in the default set), against ours x2
  (d) minimal       the minimal correct consumer: pika, the same prefetch, json.loads, COPY
                    of each batch of 1000 into the same readings table (unique key on
                    (node, sensor, seq)), commit, one basic_ack(multiple=True); no
                    validation, no duplicate handling, no rollups, no dead letters;
                    with --hostile, also on the hostile mix, where it checks each message
                    and copies the unusable ones to readings.dead with publisher confirms
  (a) raw AMQP      pika, same prefetch, json.loads, ack multiple every 500, no database
  (b) raw COPY      COPY of the same rows into the same table, 1000-row transactions
  (c) course-style  prefetch 1, one INSERT and COMMIT per message, ack per message
                    (on a smaller sample: it is slow; its rate is what matters)

Figures are printed as rates and as ratios to the baselines: the machine is shared and noisy,
the ratios are what the targets refer to. For our consumer it also prints the CPU time per
reading of each party (consumer, RabbitMQ, PostgreSQL): on a small machine they share the
cores, and that split is what limits the rate. Issue 17's targets: ours x1 at least 1.0 times
(d); the CPU per reading of all parties within 1.2 times that of (a) and (b) together; the
hostile run at least 0.9 times the clean one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pika
import psycopg

from bench.cpu import CpuMeter, postmaster_pid, snapshot
from pipeline.decode import Reading
from tempmon_contract.wire import reading_payload
from tests.harness import PostgresServer, RabbitBroker

PREFETCH = 3000


def reading_rows(n: int, offset: int = 0) -> list[Reading]:
    """The benchmark's readings as the decoder makes them: 50 nodes x 4 sensors, 10 ms apart,
    ending 30 minutes ago."""
    start = datetime.now(UTC) - timedelta(minutes=30)
    return [
        Reading(
            f"node-{i % 50}",
            f"s{i % 4}",
            "ds18b20",
            i,
            start + timedelta(milliseconds=i * 10),
            20 + (i % 97) / 10,
            None,
            False,
        )
        for i in range(offset, offset + n)
    ]


def readings(n: int, offset: int = 0) -> list[tuple[str, bytes]]:
    """The same readings as queued messages: (routing key, payload)."""
    return [
        (f"sensors.{r.node}.{r.sensor}", reading_payload(**r._asdict()))
        for r in reading_rows(n, offset)
    ]


# Unusable messages of the kinds a broken or hostile node sends: each one is dead-lettered.
def _reading_json(node: str, kind: str, temperature_c: float) -> bytes:
    return json.dumps(
        {
            "version": 1,
            "node": node,
            "sensor": "s0",
            "kind": kind,
            "seq": 1,
            "ts": "2026-01-01T00:00:00Z",
            "temperature_c": temperature_c,
        }
    ).encode()


_HOSTILE: tuple[bytes, ...] = (
    b"not json at all",
    b'{"version": 1, "node": "node-0"}',
    _reading_json("node-0", "ds18b20", 999),  # out of the sensor's range
    _reading_json("other", "ds18b20", 20),  # another node's id on node-0's topic
    _reading_json("node-0", "toaster", 20),  # no such kind
    b"[" * 500,
)


def unusable_messages(n: int) -> list[bytes]:
    """``n`` unusable messages, the kinds above in turn."""
    return [_HOSTILE[i % len(_HOSTILE)] for i in range(n)]


def mixed(clean: list[tuple[str, bytes]], share: float) -> tuple[list[tuple[str, bytes]], int]:
    """The clean readings with unusable messages spread evenly among them: (messages, hostile)."""
    if share <= 0:
        return clean, 0
    every = max(1, round((1 - share) / share))  # 10 %: one hostile after every 9 clean ones
    out: list[tuple[str, bytes]] = []
    hostile = 0
    for i, message in enumerate(clean):
        out.append(message)
        if (i + 1) % every == 0:
            out.append(("sensors.node-0.s0", _HOSTILE[hostile % len(_HOSTILE)]))
            hostile += 1
    return out, hostile


def publish(broker: RabbitBroker, messages: list[tuple[str, bytes]]) -> None:
    """Queue the messages; return when all of them are in ``readings``.

    Without publisher confirms (which would make this a round trip per message), the
    connection stays open until the queue holds them all: a quorum queue's publishing channel
    buffers commands on the broker's side, and closing the connection at once lost a few of
    them now and then.
    """
    props = pika.BasicProperties(delivery_mode=2)
    with contextlib.closing(broker.connection(broker.admin)) as conn:
        channel = conn.channel()
        for key, body in messages:
            channel.basic_publish("amq.topic", key, body, props)
        deadline = time.monotonic() + 300
        while broker.depth("readings") < len(messages):
            if time.monotonic() > deadline:
                raise TimeoutError("messages did not reach the queue")
            conn.process_data_events(time_limit=0.5)


def quiesce(
    broker: RabbitBroker, pg: PostgresServer | None = None, *, limit_s: float = 60.0
) -> float:
    """Wait until the broker and the database (if any) are idle; return the seconds waited.

    A run used to start while the previous one's aftermath still ran: PostgreSQL writing out
    the last run's rows (checkpoint, autovacuum), the quorum queue moving the publish from its
    write-ahead log into segment files. A run after a heavy one (two replicas) then paid for it:
    every party's CPU per reading rose by a fifth and the hostile run's ratio to the clean
    one fell from 0.92 to 0.78 (four rounds each way, 2026-12-07). So every timed run starts
    after a CHECKPOINT and once both servers together use under 5 % of a core over half a
    second, or after ``limit_s``.
    """
    began = time.monotonic()
    roots = {broker.pid}
    if pg is not None:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        roots.add(postmaster_pid(pg.data))

    def busy() -> dict[int, float]:
        """CPU seconds so far of each of the broker's and the postmaster's processes."""
        procs = snapshot()
        tree = set(roots)
        for pid, (ppid, _sid, _cpu) in sorted(procs.items()):
            if ppid in tree:
                tree.add(pid)  # the postmaster's children, the broker's helpers
        return {pid: procs[pid][2] for pid in tree if pid in procs}

    before = busy()
    while time.monotonic() - began < limit_s:
        time.sleep(0.5)
        now = busy()
        # Per process: one that exited between the samples must not subtract its lifetime's
        # CPU from the sum; one that started counts in full.
        used = sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())
        if used < 0.05 * 0.5:
            return time.monotonic() - began
        before = now
    print(f"  the servers were still busy after {limit_s:.0f} s; starting anyway", flush=True)
    return time.monotonic() - began


def fresh_db(pg: PostgresServer) -> str:
    _name, url = pg.owned_database("bench")
    return url


_POLLS: dict[str, psycopg.Connection[tuple[object, ...]]] = {}


def count_rows(url: str) -> int:
    # The ten-minute rollup is committed with the rows and is a few hundred rows long: polling
    # it costs the database nothing, where count(*) over readings would compete with the drain.
    # One connection per database for the polls (closed by close_polls): a new one per poll
    # was a backend fork and login every 20 ms, charged to PostgreSQL's CPU.
    conn = _POLLS.get(url)
    if conn is None or conn.closed:
        conn = _POLLS[url] = psycopg.connect(url, autocommit=True)
    row = conn.execute("SELECT coalesce(sum(n), 0) FROM readings_10min").fetchone()
    return int(row[0]) if row else 0


def wait_stored(broker: RabbitBroker, url: str, n: int, dead: int) -> tuple[float, float]:
    """Wait until ``n`` rows are stored and ``dead`` messages are in ``readings.dead``; return
    when each was first seen (``perf_counter``; 0.0 for no dead letters)."""
    rows_at = dead_at = 0.0
    with contextlib.closing(broker.connection()) as amqp:
        channel = amqp.channel()  # one channel for the dead-letter queue's polls

        def done() -> bool:
            return bool(rows_at and (dead_at or not dead))

        while not done():
            now = time.perf_counter()
            if not rows_at and count_rows(url) >= n:
                rows_at = now
            if dead and not dead_at:
                ok = channel.queue_declare("readings.dead", passive=True)
                if int(ok.method.message_count) >= dead:
                    dead_at = now
            if not done():
                time.sleep(0.02)
    return rows_at, dead_at


def close_polls() -> None:
    for conn in _POLLS.values():
        conn.close()
    _POLLS.clear()


def timed(label: str, work: Callable[[], int]) -> tuple[str, int, float]:
    began = time.perf_counter()
    done = work()
    elapsed = time.perf_counter() - began
    print(f"  {label}: {done} in {elapsed:.1f} s", flush=True)
    return label, done, elapsed


CPU_SPLIT: dict[str, dict[str, float]] = {}
STARTUP: dict[str, float] = {}  # label -> seconds from spawning to the first consumer ready
DRAIN_S: dict[str, float] = {}  # label -> seconds from then to the last row stored


def ours(
    broker: RabbitBroker,
    pg: PostgresServer,
    url: str,
    n: int,
    replicas: int,
    *,
    dead: int = 0,
    label: str | None = None,
) -> int:
    """Run ``replicas`` consumers until ``n`` rows are stored and ``dead`` messages
    dead-lettered; return how many messages they took off the queue."""
    env = {
        **os.environ,
        "RABBITMQ_URL": f"amqp://127.0.0.1:{broker.amqp_port}/%2F",
        "RABBITMQ_USER": broker.pipeline.username,
        "RABBITMQ_PASSWORD": broker.pipeline.password,
        "DATABASE_URL": url,
        "PIPELINE_METRICS_PORT": "0",
        "PIPELINE_LOG_INTERVAL_S": "3600",
        "PIPELINE_PREFETCH": str(PREFETCH),
    }
    began = time.perf_counter()
    # BENCH_WRAP runs each replica under a profiler, e.g. "py-spy record -f raw -o p.txt --".
    wrap = os.environ.get("BENCH_WRAP", "").split()
    procs = [
        subprocess.Popen(
            [*wrap, sys.executable, "-m", "pipeline", "consume"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(replicas)
    ]
    ready: list[float] = []

    def watch(proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # read to the end, so the pipe never fills
            if "consuming queues" in line and not ready:
                ready.append(time.perf_counter())

    for p in procs:
        threading.Thread(target=watch, args=(p,), daemon=True).start()
    meter = CpuMeter(
        {"consumer": [p.pid for p in procs], "PostgreSQL": [postmaster_pid(pg.data)]},
        {"RabbitMQ": [broker.pid]},
    )
    label = label or f"ours x{replicas}"
    try:
        # The interpreter's start, imports and connections are not throughput: the time and
        # the CPU are taken from the moment the first replica consumes until the last row is
        # stored. (Until 2026-12-07 the time also held the run's fresh database, made and
        # migrated in about 0.8 s, and the consumers' shutdown, and the CPU their start-up.)
        while not ready:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{label}: a consumer exited before consuming")
            if time.perf_counter() - began > 120:
                raise TimeoutError(f"{label}: no consumer started within 120 s")
            time.sleep(0.002)
        meter.start()
        rows_at, dead_at = wait_stored(broker, url, n, dead)
        stored = max(rows_at, dead_at)
        CPU_SPLIT[label] = meter.stop()
        STARTUP[label] = ready[0] - began
        DRAIN_S[label] = stored - ready[0]
        if dead:
            print(
                f"  {label}: the last row {rows_at - ready[0]:.2f} s after consuming began, "
                f"the last dead letter {dead_at - ready[0]:.2f} s",
                flush=True,
            )
    finally:
        close_polls()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    return n + dead


class Connects(Protocol):
    def connection(self) -> pika.BlockingConnection: ...


def raw_amqp(broker: Connects, n: int, *, idle_s: float = 5) -> int:
    """(a): take ``n`` messages off ``readings`` (json.loads each, a multiple ack every 500,
    no database); stops early after ``idle_s`` with nothing delivered."""
    got = 0
    with contextlib.closing(broker.connection()) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=PREFETCH)
        last_tag = acked = 0
        for method, _props, body in channel.consume("readings", inactivity_timeout=idle_s):
            if method is None:
                break
            json.loads(body)
            got += 1
            last_tag = method.delivery_tag
            if got % 500 == 0:
                channel.basic_ack(last_tag, multiple=True)
                acked = last_tag
            if got >= n:
                break
        if last_tag != acked:
            channel.basic_ack(last_tag, multiple=True)
        channel.cancel()
    return got


_COPY_ROWS = "COPY readings (node, sensor, seq, kind, ts, temperature_c, humidity_pct) FROM STDIN"


_RANGE_C = {"ds18b20": (-55.0, 125.0), "dht22": (-40.0, 80.0)}


def _unusable(routing_key: str, body: bytes) -> tuple[str | None, dict[str, object]]:
    """The least a consumer must check before storing a reading: (reason, reading)."""
    try:
        r = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}", {}
    reason = _not_a_reading(routing_key, r)
    return reason, ({} if reason else r)


def _not_a_reading(routing_key: str, r: object) -> str | None:
    fields = ("node", "sensor", "seq", "kind", "ts", "temperature_c")
    if (
        not isinstance(r, dict)
        or any(k not in r for k in fields)
        or not isinstance(r["kind"], str)
        or not isinstance(r["temperature_c"], int | float)
    ):
        return "not a reading: a field is missing or of the wrong type"
    limits = _RANGE_C.get(r["kind"])
    if limits is None:
        return f"kind={r['kind']!r}: no such sensor kind"
    topic = routing_key.split(".")
    if len(topic) != 3 or topic[1] != r["node"]:
        return f"node={r['node']!r} is not the node of topic {routing_key!r}"
    if not limits[0] <= r["temperature_c"] <= limits[1]:
        return f"temperature_c={r['temperature_c']!r} is out of the sensor's range"
    return None


class _Copies:
    """Dead-letter copies published with publisher confirms, not waited on one by one: a
    batch's copies are confirmed before the batch is acknowledged, as in our consumer.
    pika's blocking channel waits for each confirm; its own channel (``_impl``) does not."""

    def __init__(self, conn: pika.BlockingConnection) -> None:
        self.conn = conn
        self.impl: pika.channel.Channel = getattr(conn.channel(), "_impl")  # noqa: B009
        self.published = 0
        self.unconfirmed: set[int] = set()
        self.refused = 0
        selected: list[bool] = []
        self.impl.confirm_delivery(self._confirmed, callback=lambda _frame: selected.append(True))
        while not selected:
            conn.process_data_events(time_limit=0.1)

    def _confirmed(self, frame: pika.frame.Method) -> None:  # type: ignore[type-arg]
        if isinstance(frame.method, pika.spec.Basic.Nack):
            self.refused += 1
        tag = frame.method.delivery_tag
        if frame.method.multiple:
            self.unconfirmed = {t for t in self.unconfirmed if t > tag}
        else:
            self.unconfirmed.discard(tag)

    def publish(self, body: bytes, reason: str) -> None:
        self.impl.basic_publish(
            "",
            "readings.dead",
            body,
            pika.BasicProperties(delivery_mode=2, headers={"x-reason": reason}),
        )
        self.published += 1
        self.unconfirmed.add(self.published)

    def wait(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.unconfirmed:
            if not self.impl.is_open or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(self.unconfirmed)} dead-letter copies unconfirmed "
                    f"(channel {'open' if self.impl.is_open else 'closed'})"
                )
            self.conn.process_data_events(time_limit=0.001)
        if self.refused:
            raise RuntimeError(f"the broker refused {self.refused} dead-letter copies")


def minimal(
    broker: Connects, url: str, n: int, *, batch: int = 1000, dead: int = 0, idle_s: float = 5
) -> int:
    """The minimal correct consumer: a batch is acknowledged only after its COPY committed.
    With ``dead`` unusable messages mixed in, it checks each message (``_unusable``) and
    copies each unusable one, with its reason, to ``readings.dead``; the batch's copies are
    confirmed before its acknowledgement. Returns the messages it took off the queue."""
    got = in_batch = 0
    rows: list[tuple[object, ...]] = []
    with psycopg.connect(url) as db, contextlib.closing(broker.connection()) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=PREFETCH)
        copies = _Copies(conn) if dead else None
        # A batch is ``batch`` messages, stored or copied: it never waits for more
        # deliveries than the prefetch lets in.
        for method, _props, body in channel.consume("readings", inactivity_timeout=idle_s):
            if method is None:
                break
            if copies is None:
                r = json.loads(body)
            else:
                reason, r = _unusable(method.routing_key, body)
                if reason is not None:
                    copies.publish(body, reason)
            if r:
                rows.append(
                    (
                        r["node"],
                        r["sensor"],
                        r["seq"],
                        r["kind"],
                        r["ts"],
                        r["temperature_c"],
                        r.get("humidity_pct"),
                    )
                )
            in_batch += 1
            copied = copies.published if copies else 0
            if in_batch >= batch or got + len(rows) + copied >= n + dead:
                if rows:
                    with db.cursor() as cur, cur.copy(_COPY_ROWS) as copy:
                        for row in rows:
                            copy.write_row(row)
                    db.commit()
                if copies is not None:
                    copies.wait()
                channel.basic_ack(method.delivery_tag, multiple=True)
                got += len(rows)
                rows.clear()
                in_batch = 0
                if got + copied >= n + dead:
                    break
        channel.cancel()
    if copies is not None and copies.published != dead:
        raise RuntimeError(f"(d) copied {copies.published} messages, expected {dead}")
    return got + (copies.published if copies else 0)


def raw_copy(url: str, messages: list[tuple[str, bytes]]) -> int:
    rows = [json.loads(body) for _, body in messages]
    with psycopg.connect(url) as conn:
        for i in range(0, len(rows), 1000):
            with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY readings (node, sensor, seq, kind, ts, temperature_c) FROM STDIN"
                ) as copy,
            ):
                for r in rows[i : i + 1000]:
                    copy.write_row(
                        (r["node"], r["sensor"], r["seq"], r["kind"], r["ts"], r["temperature_c"])
                    )
            conn.commit()
    return len(rows)


def course_style(broker: RabbitBroker, url: str, n: int) -> int:
    got = 0
    with psycopg.connect(url) as db, contextlib.closing(broker.connection()) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=1)
        for method, _props, body in channel.consume("readings", inactivity_timeout=5):
            if method is None:
                break
            r = json.loads(body)
            db.execute(
                "INSERT INTO readings (node, sensor, seq, kind, ts, temperature_c)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (r["node"], r["sensor"], r["seq"], r["kind"], r["ts"], r["temperature_c"]),
            )
            db.commit()
            channel.basic_ack(method.delivery_tag)
            got += 1
            if got >= n:
                break
        channel.cancel()
    return got


def clean_of(label: str) -> str:
    """The clean run a hostile run's rate is a share of: ``ours x2 10% hostile`` -> ``ours x2``."""
    return " ".join(label.split()[:2]) if label.startswith("ours") else "(d) minimal consumer"


def hostile_run(
    broker: RabbitBroker,
    pg: PostgresServer,
    data: list[tuple[str, bytes]],
    share: float,
    results: dict[str, float],
    *,
    replicas: int = 1,
) -> None:
    """``replicas`` on the same readings with ``share`` unusable messages mixed in."""
    n = len(data)
    messages, bad = mixed(data, share)
    label = f"ours x{replicas} {share:.0%} hostile"
    print(f"{label}: queueing {n} readings and {bad} unusable messages", flush=True)
    broker.purge("readings.dead")
    publish(broker, messages)
    url = fresh_db(pg)
    quiesce(broker, pg)
    label, done, _s = timed(
        label, lambda: ours(broker, pg, url, n, replicas, dead=bad, label=label)
    )
    startup = STARTUP[label]
    print(f"  {label}: consuming after {startup:.1f} s of start-up, not counted")
    results[label] = done / DRAIN_S[label]
    clean = results[clean_of(label)]
    print(f"  {label}: {results[label] / clean:.0%} of the clean rate (messages/s)")


def _minimal_run(
    broker: RabbitBroker,
    pg: PostgresServer,
    label: str,
    messages: list[tuple[str, bytes]],
    *,
    dead: int,
    results: dict[str, float],
) -> None:
    """(d) on ``messages``, ``dead`` of them unusable: its rate and CPU split under ``label``."""
    n = len(messages) - dead
    print(f"{label}: queueing {n} readings and {dead} unusable messages", flush=True)
    broker.purge("readings.dead")
    publish(broker, messages)
    url = fresh_db(pg)
    quiesce(broker, pg)
    meter = CpuMeter(
        {"consumer": [os.getpid()], "PostgreSQL": [postmaster_pid(pg.data)]},
        {"RabbitMQ": [broker.pid]},
    )
    meter.start()
    label, done, s = timed(label, lambda: minimal(broker, url, n, dead=dead))
    results[label] = done / s
    CPU_SPLIT[label] = meter.stop()


def baselines(
    broker: RabbitBroker,
    pg: PostgresServer,
    data: list[tuple[str, bytes]],
    results: dict[str, float],
    *,
    runs: set[str],
    course_readings: int,
    hostile: float = 0.0,
) -> None:
    """The runs (d), (a), (b) and (c) that are in ``runs``, on the same readings; with
    ``hostile`` above 0, (d) also on the hostile run's mix."""
    n = len(data)
    if "minimal" in runs:
        _minimal_run(broker, pg, "(d) minimal consumer", data, dead=0, results=results)
        if hostile > 0:
            # The same consumer on the hostile run's mix: what the broker's durable, confirmed
            # copies of the unusable messages cost a consumer that does nothing else.
            messages, bad = mixed(data, hostile)
            label = f"(d) {hostile:.0%} hostile"
            _minimal_run(broker, pg, label, messages, dead=bad, results=results)
            print(
                f"  {label}: {results[label] / results['(d) minimal consumer']:.0%} of (d)'s "
                "clean rate (messages/s)"
            )
    if "a" in runs:
        print(f"(a) raw AMQP: queueing {n}", flush=True)
        publish(broker, data)
        quiesce(broker, pg)
        meter = CpuMeter({"consumer": [os.getpid()]}, {"RabbitMQ": [broker.pid]})
        meter.start()
        label, done, s = timed("(a) raw AMQP drain", lambda: raw_amqp(broker, n))
        results[label] = done / s
        CPU_SPLIT[label] = {"PostgreSQL": 0.0, **meter.stop()}
    if "b" in runs:
        url = fresh_db(pg)
        quiesce(broker, pg)
        meter = CpuMeter({"consumer": [os.getpid()], "PostgreSQL": [postmaster_pid(pg.data)]})
        meter.start()
        label, done, s = timed("(b) raw COPY", lambda: raw_copy(url, data))
        results[label] = done / s
        CPU_SPLIT[label] = {"RabbitMQ": 0.0, **meter.stop()}
    if "c" in runs:
        sample = readings(course_readings, offset=n)
        publish(broker, sample)
        url = fresh_db(pg)
        quiesce(broker, pg)
        label, done, s = timed(
            "(c) course-style", lambda: course_style(broker, url, course_readings)
        )
        results[label] = done / s


RUNS = ("ours1", "ours2", "hostile", "hostile2", "minimal", "a", "b", "c")
DEFAULT_RUNS = ("ours1", "ours2", "hostile", "minimal", "a", "b", "c")


def main() -> int:
    global PREFETCH  # noqa: PLW0603 - one knob for every consumer of the run
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--course-readings", type=int, default=5_000)
    parser.add_argument(
        "--hostile", type=float, default=0.1, help="share of unusable messages (0 skips the run)"
    )
    parser.add_argument(
        "--prefetch", type=int, default=PREFETCH, help="every consumer's prefetch budget"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the chosen runs, interleaved; medians are reported (the machine is noisy)",
    )
    parser.add_argument(
        "--runs",
        default=",".join(DEFAULT_RUNS),
        help=f"which runs, comma-separated: {','.join(RUNS)} (default all but hostile2)",
    )
    parser.add_argument(
        "--dead-queue",
        choices=("quorum", "classic"),
        default="quorum",
        help="readings.dead's type; classic is an experiment only (what the replicated, durable "
        "copy costs): the gateway's definitions make it a quorum queue",
    )
    args = parser.parse_args()
    runs = chosen_runs(parser, args.runs, hostile=args.hostile)
    PREFETCH = args.prefetch
    n = args.readings
    rounds: list[dict[str, float]] = []
    splits: list[dict[str, dict[str, float]]] = []
    with RabbitBroker() as broker, PostgresServer() as pg:
        if args.dead_queue != "quorum":
            redeclare_dead_queue(broker, args.dead_queue)
        data = readings(n)
        for round_ in range(1, args.repeat + 1):
            if args.repeat > 1:
                print(f"round {round_} of {args.repeat}", flush=True)
            results: dict[str, float] = {}
            CPU_SPLIT.clear()
            one_round(broker, pg, data, results, runs=runs, hostile=args.hostile)
            baselines(
                broker,
                pg,
                data,
                results,
                runs=runs,
                course_readings=args.course_readings,
                hostile=args.hostile,
            )
            rounds.append(results)
            splits.append(dict(CPU_SPLIT))
    medians = {label: statistics.median(r[label] for r in rounds) for label in rounds[0]}
    CPU_SPLIT.clear()
    for label, split in splits[0].items():
        CPU_SPLIT[label] = {p: statistics.median(s[label][p] for s in splits) for p in split}
    if len(rounds) > 1:
        print("\nper round:")
        for i, r in enumerate(rounds, 1):
            cells = "  ".join(f"{label} {rate:.0f}/s" for label, rate in r.items())
            ratio = ""
            if "ours x1" in r and "(d) minimal consumer" in r:
                ratio = f"  ours x1 / (d) = {r['ours x1'] / r['(d) minimal consumer']:.2f}"
            for label, rate in r.items():
                clean = clean_of(label)
                if label.endswith("hostile") and clean in r:
                    ratio += f"  {label} / clean = {rate / r[clean]:.2f}"
            print(f"  {i}: {cells}{ratio}")
        print_hostile_ratios(rounds)
        print("medians below (a ratio of medians is not the median of the rounds' ratios)")
    results = medians
    report(n, results)
    return 0


def chosen_runs(parser: argparse.ArgumentParser, names: str, *, hostile: float) -> set[str]:
    """The runs named in ``--runs``, with the clean run each hostile run is a share of."""
    runs = set(names.split(","))
    if unknown := runs - set(RUNS):
        parser.error(f"--runs: unknown run(s) {sorted(unknown)}; choose from {','.join(RUNS)}")
    if hostile <= 0:
        runs -= {"hostile", "hostile2"}
    if "hostile" in runs:
        runs.add("ours1")
    if "hostile2" in runs:
        runs.add("ours2")
    return runs


def redeclare_dead_queue(broker: RabbitBroker, kind: str) -> None:
    """Replace readings.dead, empty, by a durable queue of type ``kind`` (an experiment: the
    policy on its name still sets its length limit)."""
    with contextlib.closing(broker.connection(broker.admin)) as conn:
        channel = conn.channel()
        channel.queue_delete("readings.dead")
        channel.queue_declare("readings.dead", durable=True, arguments={"x-queue-type": kind})
    listed = dict(
        line.split("\t")[:2] for line in broker.ctl("list_queues", "name", "type").splitlines()
    )
    if listed.get("readings.dead") != kind:
        raise RuntimeError(f"readings.dead is {listed.get('readings.dead')!r}, not {kind!r}")
    print(f"readings.dead is a {kind} queue for this run (an experiment)", flush=True)


def print_hostile_ratios(rounds: list[dict[str, float]]) -> None:
    """Each hostile run's rate over its consumer's clean rate: the median of the rounds."""
    for label in rounds[0]:
        clean = clean_of(label)
        if label.endswith("hostile") and clean in rounds[0]:
            ratios = sorted(r[label] / r[clean] for r in rounds)
            print(
                f"  {label} / clean, median of the rounds' ratios: "
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
            )


def one_round(
    broker: RabbitBroker,
    pg: PostgresServer,
    data: list[tuple[str, bytes]],
    results: dict[str, float],
    *,
    runs: set[str],
    hostile: float,
) -> None:
    """Our consumer's runs that are in ``runs``: one replica, two, and the hostile mix."""
    n = len(data)
    for replicas in (1, 2):
        if f"ours{replicas}" not in runs:
            continue
        print(f"ours x{replicas}: queueing {n}", flush=True)
        publish(broker, data)
        url = fresh_db(pg)
        quiesce(broker, pg)
        label, done, _s = timed(
            f"ours x{replicas}",
            lambda r=replicas, u=url: ours(broker, pg, u, n, r),  # type: ignore[misc]
        )
        startup = STARTUP[label]
        print(f"  {label}: consuming after {startup:.1f} s of start-up, not counted")
        results[label] = done / DRAIN_S[label]
    if "hostile" in runs:
        hostile_run(broker, pg, data, hostile, results)
    if "hostile2" in runs:
        hostile_run(broker, pg, data, hostile, results, replicas=2)


def _ratio(rate: float, base: float | None) -> str:
    return f"{rate / base:.2f}x" if base else "-"


def report(n: int, results: dict[str, float]) -> None:
    """The rates, each as a ratio to the baselines of the same run, and the CPU split."""
    minimal_rate = results.get("(d) minimal consumer")
    floor = min(
        (results[k] for k in ("(a) raw AMQP drain", "(b) raw COPY") if k in results),
        default=None,
    )
    course = results.get("(c) course-style")
    print(f"\nPipeline drain, {n} readings ({os.cpu_count()} cores), prefetch {PREFETCH}")
    print(f"{'path':<24}{'readings/s':>12}{'vs (d)':>9}{'vs min(a,b)':>13}{'vs (c)':>9}")
    for label, rate in results.items():
        print(
            f"{label:<24}{rate:>12.0f}{_ratio(rate, minimal_rate):>9}"
            f"{_ratio(rate, floor):>13}{_ratio(rate, course):>9}"
        )
    print("targets: ours x1 >= 1.0x (d); the hostile run >= 0.9x ours x1")
    for label, rate in results.items():
        if not label.endswith("hostile"):
            continue
        clean = clean_of(label)
        if clean in results:
            print(f"{label}: {rate / results[clean]:.2f} of {clean}'s clean rate")
    if not CPU_SPLIT:
        return
    print(f"\nCPU time per reading ({os.cpu_count()} cores to share; 'consumer' is the bench")
    print("process itself for (a), (b) and (d))")
    parties = ("consumer", "RabbitMQ", "PostgreSQL")
    print(f"{'run':<24}" + "".join(f"{p:>12}" for p in parties) + f"{'total':>12}")
    totals: dict[str, float] = {}
    for label, split in CPU_SPLIT.items():
        totals[label] = sum(split[p] for p in parties) / n * 1e6
        cells = "".join(f"{split[p] / n * 1e6:>10.1f}us" for p in parties)
        print(f"{label:<24}{cells}{totals[label]:>10.1f}us")
    raw = [totals.get("(a) raw AMQP drain"), totals.get("(b) raw COPY")]
    if "ours x1" in totals and None not in raw:
        base = sum(r for r in raw if r is not None)
        print(
            f"ours x1 total / ((a) + (b)) = {totals['ours x1']:.1f} / {base:.1f} us"
            f" = {totals['ours x1'] / base:.2f}x (target <= 1.2x)"
        )


if __name__ == "__main__":
    sys.exit(main())
