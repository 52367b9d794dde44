"""End to end: MQTT publish -> broker -> `pipeline consume` -> committed row, in one run.

    .venv/bin/python -m bench.e2e [--seconds 15] [--client lite|paho] [--processes 1]

Four publishers, each with its own node user (QoS 1, 100 in flight each). By default they are
bench.mqtt_lite connections on one event loop; ``--client paho`` makes them paho-mqtt 2.x
clients (what the edge agent uses; four to five times the CPU per publish), and
``--processes N`` spreads them over N processes. On two cores the load generator competes
with what it measures: with paho in one process the baseline below was the generator's limit
(its interpreter lock), not the broker's.

Each reading carries its publish time in ``ts``; the row's ``received_at`` is the time of the
pipeline's transaction, so ``received_at - ts`` is the latency from publish to commit (to
within the few milliseconds the commit itself takes). Offered rates: 100/s and 1,000/s, then
four publishers as fast as the broker acknowledges ("max"). Baseline, same run: the broker's
own QoS 1 ingest rate into the readings queue with nothing consuming, measured before and
after the consumer's runs; the ratios are to the higher of the two.

The maximum is also offered to two of bench.drain's baselines in place of ours, each a
process of its own: the minimal correct consumer (d) ("max, (d)"), what the broker and
PostgreSQL leave of the ingest to a consumer that does the least a correct one must; and the
raw AMQP drain (a) ("max, (a)"), which stores nothing: what taking the messages off the queue
at all leaves of it. Each run's CPU is metered per party (publishers, RabbitMQ, consumer,
PostgreSQL) and printed as cores busy on average.

Targets: p99 under 300 ms at 1,000 readings/s; sustained rate within 10 % of the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.process
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bench import mqtt_lite
from bench.cpu import CpuMeter, postmaster_pid
from tempmon_contract.wire import reading_payload
from tests.harness import NodeCredentials, PostgresServer, RabbitBroker

PUBLISHERS = 4


class Publisher(threading.Thread):
    """One node's paho client publishing its ``plan``."""

    def __init__(self, mqtt_port: int, creds: NodeCredentials, plan: Plan) -> None:
        super().__init__(daemon=True)
        self.creds, self.plan = creds, plan
        self.window = threading.Semaphore(100)
        self.done = threading.Event()
        self.acked = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=creds.username, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(creds.username, creds.password)
        self.client.max_inflight_messages_set(100)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", mqtt_port)
        self.client.loop_start()

    def _on_publish(self, *_args: object) -> None:
        self.acked += 1
        self.window.release()
        if self.acked >= self.plan.total:
            self.done.set()

    def run(self) -> None:
        node, plan = self.creds.username, self.plan
        began = time.perf_counter()
        for i in range(plan.total):
            if plan.per_node:
                delay = began + i / plan.per_node - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.window.acquire()
            self.client.publish(f"sensors/{node}/s1", _body(node, plan.first_seq + i), qos=1)
        self.done.wait(300)
        self.client.disconnect()
        self.client.loop_stop()


def _per_node(rate: float, seconds: float, nodes: int) -> tuple[float, int]:
    """(rate per node, readings per node) for ``rate`` per second in total (0 = max)."""
    if rate:
        return rate / nodes, int(rate / nodes * seconds)
    return 0.0, int(6000 * seconds / nodes)


def _body(node: str, seq: int) -> bytes:
    return reading_payload(
        node=node, sensor="s1", kind="simulated", seq=seq, ts=time.time(), temperature_c=21.0
    )


@dataclass(frozen=True)
class Plan:
    """What each node publishes: ``total`` readings from ``first_seq``, at ``per_node`` a
    second (0: as fast as acknowledged)."""

    per_node: float
    total: int
    first_seq: int


def _paho_publish(
    port: int, nodes: list[NodeCredentials], plan: Plan, *, ready: Callable[[], None]
) -> float:
    """One paho client (and its network thread) per node; seconds from ``ready`` to the last
    PUBACK."""
    threads = [Publisher(port, c, plan) for c in nodes]
    ready()
    began = time.perf_counter()
    for p in threads:
        p.start()
    for p in threads:
        p.join(600)
    return time.perf_counter() - began


async def _connect_all(
    port: int,
    nodes: list[NodeCredentials],
    on_ack: Callable[[int], Callable[[float, object], None]],
) -> list[mqtt_lite.MqttConnection]:
    """One bench.mqtt_lite connection per node (``on_ack(k)`` for node k); if one fails, the
    ones already open are closed."""
    conns: list[mqtt_lite.MqttConnection] = []
    try:
        for k, c in enumerate(nodes):
            conns.append(
                await mqtt_lite.connect(
                    "127.0.0.1",
                    port,
                    client_id=c.username,
                    username=c.username,
                    password=c.password,
                    keepalive=60,
                    on_ack=on_ack(k),
                    timeout=10,
                )
            )
    except BaseException:
        for conn in conns:
            conn.disconnect()
        raise
    return conns


async def _until_acked(
    finished: asyncio.Future[None],
    conns: list[mqtt_lite.MqttConnection],
    pacers: list[asyncio.Future[None]],
) -> None:
    """Wait for ``finished`` (every PUBACK); raise on a lost connection, a failed pacer (one
    that has published its share is done without failing) or 600 s."""
    lost = [asyncio.ensure_future(conn.closed) for conn in conns]
    waiting, deadline = {finished, *lost, *pacers}, time.perf_counter() + 600
    while not finished.done() and waiting:
        done, waiting = await asyncio.wait(
            waiting,
            timeout=max(0.0, deadline - time.perf_counter()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not done or any(f in lost or f.exception() is not None for f in done):
            break
    failed = [p.exception() for p in pacers if p.done() and not p.cancelled()]
    for pacer in (*pacers, *lost):
        pacer.cancel()
    if not finished.done():
        reasons = {c.lost_reason for c in conns if c.lost}
        reasons |= {f"{type(e).__name__}: {e}" for e in failed if e is not None}
        raise RuntimeError(
            f"publishing failed: {', '.join(sorted(reasons)) or '600 s without every PUBACK'}"
        )


async def _lite_publish(
    port: int, nodes: list[NodeCredentials], plan: Plan, *, ready: Callable[[], None]
) -> float:
    """One bench.mqtt_lite connection per node on one event loop, 100 PUBLISHes in flight
    each, the next written from the PUBACK's callback; seconds from ``ready`` to the last
    PUBACK. Raises if a connection is lost."""
    per_node, total, first_seq = plan.per_node, plan.total, plan.first_seq
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    sent = dict.fromkeys(range(len(nodes)), 0)
    acked = [0]
    room = [asyncio.Event() for _ in nodes]

    def on_ack(k: int) -> Callable[[float, object], None]:
        def ack(_seconds: float, _tag: object) -> None:
            acked[0] += 1
            if acked[0] >= total * len(nodes) and not finished.done():
                finished.set_result(None)
            if per_node:
                room[k].set()
            elif sent[k] < total:  # as fast as acknowledged: the next one at once
                conns[k].publish(topics[k], _body(nodes[k].username, first_seq + sent[k]))
                sent[k] += 1

        return ack

    conns = await _connect_all(port, nodes, on_ack)
    topics = [f"sensors/{c.username}/s1" for c in nodes]

    async def paced(k: int) -> None:
        began = time.perf_counter()
        for i in range(total):
            delay = began + i / per_node - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(conns[k].inflight) >= 100:
                room[k].clear()
                await room[k].wait()
            conns[k].publish(topics[k], _body(nodes[k].username, first_seq + i))
            sent[k] += 1

    ready()
    began = time.perf_counter()
    try:
        if per_node:
            pacers: list[asyncio.Future[None]] = [
                asyncio.ensure_future(paced(k)) for k in range(len(nodes))
            ]
        else:
            pacers = []
            for k, conn in enumerate(conns):
                for _ in range(min(100, total)):
                    conn.publish(topics[k], _body(nodes[k].username, first_seq + sent[k]))
                    sent[k] += 1
        await _until_acked(finished, conns, pacers)
        return time.perf_counter() - began
    finally:
        for conn in conns:
            conn.disconnect()


def _publish_here(
    client: str,
    port: int,
    nodes: list[NodeCredentials],
    order: tuple[float, float, int, int],
    ready: Callable[[], None],
) -> tuple[int, float]:
    """Publish this process's share of one order (rate, seconds, first_seq, all nodes):
    (messages, seconds from ``ready`` to the last PUBACK)."""
    rate, seconds, first_seq, all_nodes = order
    per_node, total = _per_node(rate, seconds, all_nodes)
    plan = Plan(per_node, total, first_seq)
    if client == "lite":
        took = asyncio.run(_lite_publish(port, nodes, plan, ready=ready))
    else:
        took = _paho_publish(port, nodes, plan, ready=ready)
    return total * len(nodes), took


def _publisher_process(
    client: str, port: int, nodes: list[NodeCredentials], *, orders: Any, barrier: Any, done: Any
) -> None:
    """A process of publishers: for each order it connects its nodes' clients, waits at the
    barrier with the others, publishes, and puts its count on ``done``; None ends it."""
    while (order := orders.get()) is not None:
        sent, _took = _publish_here(client, port, nodes, order, lambda: barrier.wait(60))
        done.put(sent)


class Publishers:
    """The load generator: one MQTT client per node, QoS 1, 100 in flight each; paho-mqtt
    (what the edge agent uses; a network thread per client) or bench.mqtt_lite (one event
    loop, far less CPU per publish), in this process (``processes`` = 1) or spread over
    ``processes`` processes of their own. On two cores the generator competes with what it
    measures: the cheaper it is, the more the baseline is the broker's own. The processes live
    until :meth:`close`, so the CPU meter sees all their work as the publishers'."""

    def __init__(
        self, broker: RabbitBroker, nodes: list[NodeCredentials], client: str, processes: int
    ) -> None:
        if not 1 <= processes <= len(nodes):
            raise ValueError(
                f"processes: {processes}; give 1 to {len(nodes)} (one node at least each)"
            )
        self.port, self.nodes, self.client = broker.mqtt_port, nodes, client
        self.published_by_processes = 0
        self._orders: list[Any] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        if processes <= 1:
            return
        ctx = multiprocessing.get_context("spawn")
        self._barrier = ctx.Barrier(processes + 1)
        self._done = ctx.Queue()
        for k in range(processes):
            orders = ctx.Queue()
            proc = ctx.Process(
                target=_publisher_process,
                args=(client, self.port, nodes[k::processes]),
                kwargs={"orders": orders, "barrier": self._barrier, "done": self._done},
                daemon=True,
            )
            proc.start()
            self._orders.append(orders)
            self._procs.append(proc)

    def publish(self, rate: float, seconds: float, first_seq: int) -> tuple[int, float]:
        """(messages, seconds until every PUBACK) for ``rate`` per second in total (0 = max)."""
        order = (rate, seconds, first_seq, len(self.nodes))
        if not self._procs:
            return _publish_here(self.client, self.port, self.nodes, order, lambda: None)
        for orders in self._orders:
            orders.put(order)
        try:
            self._barrier.wait(60)
        except threading.BrokenBarrierError:
            raise RuntimeError(
                f"publisher processes did not all connect: {self._states()}"
            ) from None
        began = time.perf_counter()
        sent, reports, deadline = 0, 0, began + 600
        while reports < len(self._procs):
            try:
                sent += self._done.get(timeout=1)
                reports += 1
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs) or time.perf_counter() > deadline:
                    raise RuntimeError(f"publishing failed: {self._states()}") from None
        self.published_by_processes += sent
        return sent, time.perf_counter() - began

    def _states(self) -> str:
        return ", ".join(
            f"pid {p.pid} {'alive' if p.is_alive() else f'exited {p.exitcode}'}"
            for p in self._procs
        )

    def close(self) -> str:
        """End the processes; a line saying what they did (empty without processes)."""
        for orders in self._orders:
            orders.put(None)
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        if not self._procs:
            return ""
        return (
            f"publisher processes: {len(self._procs)} ({self._states()}), "
            f"{self.published_by_processes} messages published by them"
        )


def wait_rows(url: str, expected: int) -> float:
    """Seconds until ``expected`` readings are stored.

    The ten-minute rollup is committed with the rows and holds a few rows here: summing it
    costs the database nothing, where ``count(*)`` over ``readings`` (every 50 ms, over up to
    200,000 rows) competed with the consumer's commits it was waiting for, as in bench.drain.
    """
    began = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT coalesce(sum(n), 0) FROM readings_10min").fetchone()
            if row and row[0] >= expected:
                return time.perf_counter() - began
            time.sleep(0.05)


def latency(url: str, first_seq: int) -> tuple[float, float]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d),"
            "       percentile_cont(0.99) WITHIN GROUP (ORDER BY d)"
            "  FROM (SELECT extract(epoch FROM received_at - ts) * 1000 AS d"
            "          FROM readings WHERE seq >= %s) x",
            (first_seq,),
        ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


CPU_S: dict[str, dict[str, float]] = {}  # label -> party -> CPU seconds
WALL_S: dict[str, float] = {}  # label -> seconds the metered block took
MESSAGES: dict[str, int] = {}  # label -> messages published in the metered block


@contextlib.contextmanager
def cores(
    label: str, broker: RabbitBroker, pg: PostgresServer, consumer: int | None = None
) -> Iterator[None]:
    """Meter the block: each party's CPU seconds into ``CPU_S``, its wall time into ``WALL_S``."""
    roots: dict[str, list[int]] = {"consumer": [consumer]} if consumer else {}
    roots["PostgreSQL"] = [postmaster_pid(pg.data)]
    roots["publishers"] = [os.getpid()]  # its children above are counted as their own
    meter = CpuMeter(roots, {"RabbitMQ": [broker.pid]})
    began = time.perf_counter()
    meter.start()
    try:
        yield
    finally:
        CPU_S[label] = meter.stop()
        WALL_S[label] = time.perf_counter() - began


def other_at_max(
    broker: RabbitBroker,
    pg: PostgresServer,
    publishers: Publishers,
    seconds: float,
    *,
    raw: bool,
) -> tuple[str, float, float, float]:
    """The maximum offered to one of bench.drain's baselines in place of ours, a process of
    its own (bench.minimal_consumer). The minimal correct consumer (d): json.loads, COPY,
    commit, one ack per 1,000; no validation, duplicates, rollups or dead letters: what the
    broker and PostgreSQL leave of the ingest to a consumer that does the least a correct one
    must. The raw AMQP drain (a, ``raw``): json.loads and a multiple ack every 500, nothing
    stored: what taking the messages off the queue at all leaves of it."""
    label = "max, (a)" if raw else "max, (d)"
    broker.purge("readings", "node-status")
    expected = _per_node(0, seconds, len(publishers.nodes))[1] * len(publishers.nodes)
    argv = [sys.executable, "-m", "bench.minimal_consumer"]
    url = ""
    if raw:
        argv += ["--raw", broker.amqp_url(), str(expected)]
    else:
        _name, url = pg.owned_database("e2e")
        argv += [broker.amqp_url(), url, str(expected)]
    other = subprocess.Popen(argv)
    try:
        # Its start-up is not throughput: publishing starts once it consumes, as for ours
        # (which had its warm-up).
        with contextlib.closing(broker.connection()) as amqp:
            channel, deadline = amqp.channel(), time.monotonic() + 60
            while channel.queue_declare("readings", passive=True).method.consumer_count < 1:
                if other.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: the consumer did not start consuming")
                time.sleep(0.05)
        first = 30_000_000
        with cores(label, broker, pg, other.pid):
            sent, took = publishers.publish(0, seconds, first)
            MESSAGES[label] = sent
            ended = time.perf_counter()
            if other.wait(600) != 0:
                raise RuntimeError(f"{label}: the consumer failed")
            tail = time.perf_counter() - ended
    finally:
        if other.poll() is None:
            other.kill()
    achieved = sent / (took + tail)
    if raw:  # nothing stored: no publish-to-commit latency
        print(f"{label} raw AMQP drain: {achieved:.0f}/s", flush=True)
        return label, achieved, float("nan"), float("nan")
    p50, p99 = latency(url, first)
    print(f"{label} minimal consumer: {achieved:.0f}/s p99={p99:.0f} ms", flush=True)
    return label, achieved, p50, p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="processes the four publishers are spread over (1: all in this process)",
    )
    parser.add_argument(
        "--client",
        choices=("paho", "lite"),
        default="lite",
        help="the publishers' MQTT client: paho-mqtt, or bench.mqtt_lite (less CPU per publish)",
    )
    args = parser.parse_args()
    if not 1 <= args.processes <= PUBLISHERS:
        parser.error(f"--processes: {args.processes}; give 1 to {PUBLISHERS}")
    rows: list[tuple[str, float, float, float]] = []
    with RabbitBroker() as broker, PostgresServer() as pg:
        nodes = [broker.add_node(f"bench-{n}") for n in range(PUBLISHERS)]
        publishers = Publishers(broker, nodes, args.client, args.processes)
        try:
            baseline = _run(broker, pg, publishers, args.seconds, rows)
        finally:
            done = publishers.close()
    if done:
        print(done)
    print(
        f"\nEnd to end, MQTT QoS 1 -> committed row, {PUBLISHERS} {args.client} publishers in "
        f"{max(args.processes, 1)} process(es) ({os.cpu_count()} cores)"
    )
    print(f"{'offered':<10}{'stored/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs ingest':>11}")
    for label, achieved, p50, p99 in rows:
        print(f"{label:<10}{achieved:>10.0f}{p50:>9.0f}{p99:>9.0f}{achieved / baseline:>10.0%}")
    print(f"{'baseline':<10}{baseline:>10.0f}{'':>18}{1:>10.0%}  (broker ingest, no consumer)")
    print("targets: p99 < 300 ms at 1,000/s; max within 10 % of the broker's ingest")
    print("(a) stores nothing: its rate is what taking the messages off at all leaves of it")
    print_cores()
    return 0


def _run(
    broker: RabbitBroker,
    pg: PostgresServer,
    publishers: Publishers,
    seconds: float,
    rows: list[tuple[str, float, float, float]],
) -> float:
    """Every measurement of one run, into ``rows``; returns the higher baseline."""
    # Baseline: the broker's own QoS 1 ingest, nothing consuming.
    with cores("baseline", broker, pg):
        sent, took = publishers.publish(0, seconds, 10_000_000)
        MESSAGES["baseline"] = sent
    baseline = sent / took
    print(f"broker ingest, nothing consuming: {baseline:.0f}/s", flush=True)
    broker.purge("readings", "node-status")
    _name, url = pg.owned_database("e2e")
    consumer = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "consume"],
        env={
            **os.environ,
            "RABBITMQ_URL": broker.amqp_url(),
            "DATABASE_URL": url,
            "PIPELINE_METRICS_PORT": "0",
            "PIPELINE_LOG_INTERVAL_S": "3600",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Warm-up, not measured: connections, prepared statements, the first batches.
        stored, _ = publishers.publish(200, 2, 500_000)
        wait_rows(url, stored)
        for label, rate in (("100/s", 100.0), ("1,000/s", 1000.0), ("max", 0.0)):
            first = 1_000_000 * (len(rows) + 1)
            with cores(label, broker, pg, consumer.pid):
                sent, took = publishers.publish(rate, seconds, first)
                MESSAGES[label] = sent
                stored += sent
                tail = wait_rows(url, stored)
            p50, p99 = latency(url, first)
            achieved = sent / (took + tail)
            rows.append((label, achieved, p50, p99))
            print(f"{label}: {achieved:.0f}/s p50={p50:.0f} ms p99={p99:.0f} ms", flush=True)
    finally:
        consumer.terminate()
        consumer.wait(60)
    rows.append(other_at_max(broker, pg, publishers, seconds, raw=False))
    rows.append(other_at_max(broker, pg, publishers, seconds, raw=True))
    # The baseline again, after the runs: one measurement of it varied by a fifth between
    # runs on a quiet machine; the higher of the two is the one the ratio is taken to.
    broker.purge("readings", "node-status")
    with cores("baseline after", broker, pg):
        sent, took = publishers.publish(0, seconds, 20_000_000)
        MESSAGES["baseline after"] = sent
    after = sent / took
    print(f"broker ingest again, nothing consuming: {after:.0f}/s", flush=True)
    return max(baseline, after)


def print_cores() -> None:
    """Where the cycles went in each run: cores busy on average, per party."""
    parties = ("publishers", "RabbitMQ", "consumer", "PostgreSQL")
    print(
        f"\nCPU, cores busy on average ({os.cpu_count()} cores; the publishers are this "
        "process and its publisher processes)"
    )
    print(f"{'run':<16}" + "".join(f"{p:>12}" for p in parties) + f"{'total':>8}")
    for label, split in CPU_S.items():
        busy = {p: split.get(p, 0.0) / WALL_S[label] for p in parties}
        cells = "".join(f"{busy[p]:>12.2f}" for p in parties)
        print(f"{label:<16}{cells}{sum(busy.values()):>8.2f}")
    print("\nCPU per message, us (each party's CPU seconds over the messages published)")
    print(f"{'run':<16}" + "".join(f"{p:>12}" for p in parties) + f"{'total':>8}")
    for label, split in CPU_S.items():
        per = {p: split.get(p, 0.0) / MESSAGES[label] * 1e6 for p in parties}
        cells = "".join(f"{per[p]:>12.1f}" for p in parties)
        print(f"{label:<16}{cells}{sum(per.values()):>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
