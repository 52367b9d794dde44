"""Capacity: how many edge nodes one gateway serves, with real MQTT connections.

    .venv/bin/python -m bench.capacity [--levels 1000,5000,10000] [--seconds 60]
                                       [--target single|cluster] [--baseline 100]

For each level N the bench opens N MQTT 3.1.1 connections, one per simulated node, each with
its own broker user made by gateway/rabbitmq/users.sh as in production (one password, imported
in batches), from a few worker processes (bench/swarm.py: an asyncio client per process,
bench/mqtt_lite.py). Every node publishes one reading every ``--interval`` seconds (10 s) at
QoS 1, the agent's own payload with its publish time in ``ts``; start times are spread evenly
over the interval, so the offer is N / interval readings per second. Two `pipeline consume`
replicas, as docker compose runs them, write into a private PostgreSQL.

Per level, after a warm-up round, over ``--seconds`` of steady state:

  memory/conn   the broker's memory after all N connected and settled, minus before, over N:
                ``rabbitmqctl status`` ``memory.total`` by the broker's own calculation
                strategy (``rss`` on 3.10: the OS RSS of the VM, what the high watermark
                compares) and, next to it, ``erlang`` (``erlang:memory(total)``, which counts
                allocated, not resident, memory); summed over the target's nodes. "Before" is
                the lower of the level's own and the idle broker's before the first level (an
                allocator may keep what an earlier level's connections freed)
  rate          PUBACKs received inside the window, per second, against the offer
  PUBACK        PUBLISH -> PUBACK as the client sees it (the broker's own ingest path)
  e2e p50/p99   ``received_at - ts`` of the committed rows: publish -> committed row
  lost          PUBACKed readings with no row (exact, by (node, seq)); failed connections,
                publishes never acknowledged and connections the broker dropped are counted
  connect       from the order to connect until the last CONNACK, for all N

A small level (``--baseline``, 100 nodes) runs first in the same run; the latency columns are
also printed as ratios to it (the machines are shared and noisy). The sizing line names the
largest level where every connection was accepted, nothing was lost, every publish was
acknowledged, p99 < 1 s and the rate matched the offer (at least 97 %).

The broker side is a list of nodes (:class:`BrokerNode`); connections go round-robin over them,
the replicas are given every node (each picks one at random) and memory is summed.
``--target single`` is one :class:`~tests.harness.RabbitBroker`, as docker compose runs the
gateway; ``--target cluster`` is three nodes clustered by gateway/rabbitmq/cluster.conf, each in
a network namespace of its own (tests/harness/rabbit_cluster.py, root only), every quorum queue
on all three. A target is made by a function in :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

import pika
import psycopg
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from pika.exceptions import AMQPError

from bench.cpu import CpuMeter, postmaster_pid
from bench.swarm import ConnectReport, PublishReport, SwarmSpec, run_worker
from tests.harness import NodeCredentials, PostgresServer, RabbitBroker
from tests.harness.rabbit_cluster import RabbitCluster

NODE_PREFIX = "cap"
SEQ_STRIDE = 1_000_000  # level i's readings carry seq i * SEQ_STRIDE + round
RATE_MATCH = 0.97  # acked/s at least this share of the offer counts as "matched"
P99_LIMIT_MS = 1000.0


# -- the broker side -----------------------------------------------------------------------------
class BrokerNode(Protocol):
    """What the bench needs of one broker node. RabbitBroker is one; so is a cluster's node.

    ``host``/``mqtt_port``: where nodes connect; ``amqp_url()``: the pipeline's URL on this
    node; ``ctl``: rabbitmqctl against this node; ``users``: gateway/rabbitmq/users.sh against
    it (users are cluster-wide, so the bench calls it on the first node only).
    """

    @property
    def host(self) -> str: ...

    @property
    def mqtt_port(self) -> int: ...

    def amqp_url(self, creds: NodeCredentials | None = None) -> str: ...

    def ctl(self, *args: str, input_text: str | None = None) -> str: ...

    def users(self, *args: str, input_text: str | None = None) -> str: ...


@contextlib.contextmanager
def single_target() -> Iterator[list[BrokerNode]]:
    """One RabbitMQ node, as docker compose runs the gateway (tests/harness/rabbit.py)."""
    with RabbitBroker() as broker:
        yield [broker]


@contextlib.contextmanager
def cluster_target() -> Iterator[list[BrokerNode]]:
    """Three RabbitMQ nodes clustered by gateway/rabbitmq/cluster.conf, each a host of its own
    in a network namespace (tests/harness/rabbit_cluster.py; root only). Every quorum queue has
    all three nodes before the bench starts."""
    with RabbitCluster() as cluster:
        yield list(cluster.nodes)


# A target's nodes are made here: a function that boots them (topology loaded, `users.sh apply`
# run), yields the list, and stops them on exit.
TARGETS: dict[str, Callable[[], contextlib.AbstractContextManager[list[BrokerNode]]]] = {
    "single": single_target,
    "cluster": cluster_target,
}


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children, the broker too, inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def status(node: BrokerNode) -> dict[str, object]:
    out: dict[str, object] = json.loads(node.ctl("status", "--formatter", "json"))
    return out


@dataclass(frozen=True)
class Memory:
    """Summed over the target's nodes, in bytes."""

    total: int  # by the broker's vm_memory_calculation_strategy
    erlang: int
    rss: int  # the OS RSS of the VM, as the broker reads it
    strategy: str

    def __sub__(self, other: Memory) -> Memory:
        return Memory(
            self.total - other.total,
            self.erlang - other.erlang,
            self.rss - other.rss,
            self.strategy,
        )


def broker_memory(nodes: Sequence[BrokerNode]) -> Memory:
    total = erlang = rss = 0
    strategy = "?"
    for node in nodes:
        st = status(node)
        strategy = str(st.get("vm_memory_calculation_strategy", "?"))
        mem = st.get("memory", {})
        assert isinstance(mem, dict)
        tot = mem.get("total", {})
        if isinstance(tot, dict):
            erlang += int(tot.get("erlang") or 0)
            rss += int(tot.get("rss") or 0)
            total += int(tot.get(strategy) or tot.get("rss") or 0)
        else:
            total += int(tot)
    return Memory(total, erlang, rss, strategy)


def check_limits(nodes: Sequence[BrokerNode], most: int) -> tuple[list[str], list[int]]:
    """One line per node saying its socket and file limits, and the OS pids of the nodes'
    VMs that run on this host (for their CPU time; a remote node is not measured).

    Raises:
        RuntimeError: a node cannot hold its share of ``most`` connections.
    """
    lines, pids = [], []
    share = math.ceil(most / len(nodes))
    for i, node in enumerate(nodes):
        st = status(node)
        pid = st.get("pid")
        if isinstance(pid, int) and Path(f"/proc/{pid}").exists():
            pids.append(pid)
        fds = st.get("file_descriptors", {})
        assert isinstance(fds, dict)
        sockets = int(fds.get("sockets_limit") or fds.get("total_limit") or 0)
        lines.append(
            f"node {i}: RabbitMQ {st.get('rabbitmq_version')}, Erlang {st.get('erlang_version')}"
            f", sockets_limit {sockets:,}, file descriptors {fds.get('total_limit', '?'):,}"
        )
        if sockets < share + 100:
            raise RuntimeError(
                f"broker node {i} allows {sockets} sockets, fewer than its share of {most} "
                f"connections ({share}) plus 100: raise the file descriptor limit (ulimit -n) "
                "of the shell that starts the bench"
            )
    return lines, pids


def make_users(node: BrokerNode, ids: Sequence[str], password: str, batch: int) -> float:
    """Node users by gateway/rabbitmq/users.sh, ``batch`` ids per import, two imports at once
    (the script forks openssl a few times per user: about 20 ms each on these machines)."""
    began = time.monotonic()
    chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    with ThreadPoolExecutor(2) as pool:
        for _ in pool.map(lambda c: node.users("node", *c, input_text=password), chunks):
            pass
    return time.monotonic() - began


def queue_counts(node: BrokerNode, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``, by a passive declare as the pipeline's user
    (over AMQP: quicker than a rabbitmqctl, which starts an Erlang VM each time)."""
    conn = pika.BlockingConnection(pika.URLParameters(node.amqp_url()))
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return int(ok.method.message_count or 0), int(ok.method.consumer_count or 0)
    finally:
        conn.close()


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_responsive(node: BrokerNode, timeout: float = 600) -> float:
    """Seconds until ``node`` answers a passive declare over a new AMQP connection.

    Raises:
        TimeoutError: it did not within ``timeout``.
    """
    began = time.monotonic()
    while True:
        try:
            queue_counts(node, "readings")
        except (AMQPError, AMQPConnectorException, OSError):
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"the broker did not answer AMQP for {timeout:.0f} s") from None
            time.sleep(1)
        else:
            return time.monotonic() - began


def wait_consuming(node: BrokerNode, consumers: Consumers, replicas: int) -> None:
    """Until the readings queue has its consumers (quorum queue counts lag about a second).

    Raises:
        RuntimeError: a replica exited; TimeoutError: not consuming within 60 s.
    """
    deadline = time.monotonic() + 60
    while queue_counts(node, "readings")[1] < replicas:
        consumers.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the pipeline's replicas did not all consume within 60 s")
        time.sleep(0.5)


# -- the consumers -------------------------------------------------------------------------------
class Consumers:
    """`pipeline consume` replicas given every broker node, logs in a temp dir."""

    def __init__(self, nodes: Sequence[BrokerNode], database_url: str, replicas: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tempmon-capacity-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(replicas):
            with (self.dir / f"consume-{i}.log").open("wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pipeline", "consume"],
                        env={
                            **os.environ,
                            # Every node, as a cluster's consumers are given them; each
                            # replica picks one at random (one node: that one).
                            "RABBITMQ_URL": ",".join(n.amqp_url() for n in nodes),
                            "DATABASE_URL": database_url,
                            "PIPELINE_METRICS_PORT": "0",
                            "PIPELINE_LOG_INTERVAL_S": "3600",
                        },
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )

    def check(self) -> None:
        """Raises: RuntimeError: a replica has exited (its log's tail is in the message)."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                tail = (self.dir / f"consume-{i}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"pipeline consume #{i} exited with {proc.returncode}:\n{tail}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for log in self.dir.iterdir():
            log.unlink()
        self.dir.rmdir()


# -- one level -----------------------------------------------------------------------------------
@dataclass
class Settings:
    interval: float
    seconds: float
    warmup_rounds: int
    workers: int
    concurrency: int
    keepalive: int
    settle: float
    connect_timeout: float = 30.0
    ack_timeout: float = 30.0

    @property
    def measured_rounds(self) -> int:
        return max(1, round(self.seconds / self.interval))


@dataclass
class LevelResult:
    label: str
    n: int
    connected: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    connect_s: float = 0.0
    connect_p99_ms: float = 0.0
    mem_before: Memory | None = None
    mem_connected: Memory | None = None
    # The broker before the run's first level connected: memory a level's connections held
    # and the allocator kept after they closed is not subtracted from the next level.
    mem_idle: Memory | None = None
    offered: float = 0.0
    acked_rate: float = 0.0
    sent: int = 0
    acked: int = 0
    unacked: int = 0
    skipped: int = 0
    dropped: int = 0
    late: int = 0
    max_late_s: float = 0.0
    puback_p50: float = math.nan
    puback_p99: float = math.nan
    rows: int = 0
    lost: int = 0
    extra: int = 0
    e2e_p50: float = math.nan
    e2e_p99: float = math.nan
    e2e_max: float = math.nan
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core in the window
    puback_rounds: dict[int, float] = field(default_factory=dict)  # round -> PUBACK p99 ms
    e2e_rounds: dict[int, float] = field(default_factory=dict)  # round -> e2e p99 ms
    recover_s: float = 0.0  # after closing, until the broker answered a new AMQP connection
    idle_cpu: float = math.nan  # the broker's, all connected and nothing published (settle)
    load: float = math.nan  # the machine's 1-minute load average at the end of the window

    @property
    def failed(self) -> int:
        return self.n - self.connected

    def per_conn(self, which: str) -> float:
        """Bytes per connection: all connected and settled, minus the lower of this level's
        memory before connecting and the run's idle broker."""
        if not self.connected or self.mem_before is None or self.mem_connected is None:
            return math.nan
        floor = self.mem_before
        if self.mem_idle is not None and self.mem_idle.total < floor.total:
            floor = self.mem_idle
        delta = self.mem_connected - floor
        return float(getattr(delta, which)) / self.connected

    @property
    def rate_matched(self) -> bool:
        return self.acked_rate >= RATE_MATCH * self.offered

    @property
    def served(self) -> bool:
        """Every node connected, nothing lost or unacknowledged, p99 < 1 s, the offer met."""
        return (
            self.failed == 0
            and self.lost == 0
            and self.unacked == 0
            and self.skipped == 0
            and self.dropped == 0
            and self.e2e_p99 < P99_LIMIT_MS
            and self.rate_matched
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


class Workers:
    """The worker processes of one level, driven step by step over their pipes."""

    def __init__(self, specs: list[SwarmSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[BaseProcess] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=run_worker, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def send(self, *message: object) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def gather(self, kind: str, timeout: float) -> list[object]:
        """One ``kind`` answer from each worker.

        Raises:
            RuntimeError: a worker died or answered something else; TimeoutError: too slow.
        """
        answers: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(self.pipes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the workers did not all answer {kind!r} in {timeout:.0f} s")
            for pipe in wait([p for i, p in enumerate(self.pipes) if i not in answers], left):
                assert isinstance(pipe, Connection)
                i = self.pipes.index(pipe)
                try:
                    message = pipe.recv()
                except EOFError:
                    raise RuntimeError(
                        f"capacity worker {i} died (exit code {self.procs[i].exitcode})"
                    ) from None
                if message[0] != kind:
                    raise RuntimeError(f"worker {i} answered {message[0]!r}, not {kind!r}")
                answers[i] = message[1] if len(message) > 1 else None
        return [answers[i] for i in range(len(self.pipes))]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self) -> None:
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


@dataclass
class Run:
    """What stays the same over the levels of one run."""

    nodes: list[BrokerNode]
    node_ids: list[str]
    password: str
    settings: Settings
    pg: PostgresServer
    database: str
    consumers: Consumers
    beams: list[int]  # the brokers' VMs on this host, for their CPU time
    idle: Memory | None = None  # before the first level

    def specs(self, n: int, seq_base: int) -> list[SwarmSpec]:
        s = self.settings
        per_worker: list[list[tuple[str, str, int, int]]] = [[] for _ in range(s.workers)]
        for i in range(n):
            node = self.nodes[i % len(self.nodes)]
            per_worker[i % s.workers].append((self.node_ids[i], node.host, node.mqtt_port, i))
        return [
            SwarmSpec(
                nodes=share,
                total=n,
                password=self.password,
                interval=s.interval,
                rounds=s.warmup_rounds + s.measured_rounds,
                seq_base=seq_base,
                keepalive=s.keepalive,
                concurrency=max(1, s.concurrency // s.workers),
                connect_timeout=s.connect_timeout,
                ack_timeout=s.ack_timeout,
            )
            for share in per_worker
            if share
        ]

    def cpu_meter(self, workers: Workers) -> CpuMeter:
        return CpuMeter(
            {
                "broker": self.beams,
                "pipeline": [p.pid for p in self.consumers.procs],
                "PostgreSQL": [postmaster_pid(self.pg.data)],
                "clients": workers.pids,
            }
        )

    def level(self, label: str, n: int, index: int) -> LevelResult:
        s = self.settings
        result = LevelResult(label, n, offered=n / s.interval)
        seq_base = index * SEQ_STRIDE
        workers = Workers(self.specs(n, seq_base))
        try:
            self._connect(workers, result)
            meter = self.cpu_meter(workers)
            t0 = time.time() + 0.5
            start = t0 + s.warmup_rounds * s.interval
            end = start + s.measured_rounds * s.interval
            workers.send("publish", t0, start, end)
            machine: list[float] = []

            def begin() -> None:
                machine.append(machine_busy())
                meter.start(1.0)

            threading.Timer(max(0.0, start - time.time()), begin).start()
            time.sleep(max(0.0, end - time.time()))
            cpu = meter.stop()
            busy = machine_busy() - machine[0]
            result.cpu = {k: v / (end - start) for k, v in cpu.items()}
            # Everything else on this shared machine (other engineers' tests), same window.
            result.cpu["others"] = max(0.0, busy / (end - start) - sum(result.cpu.values()))
            result.load = os.getloadavg()[0]
            published: list[PublishReport] = workers.gather(  # type: ignore[assignment]
                "published", s.ack_timeout + 300
            )
            workers.send("close")
            workers.gather("closed", 120)
        finally:
            workers.close()
        # Closing thousands of connections keeps a broker busy for a while; the next step
        # (and the next level's "before") waits until it answers again.
        result.recover_s = wait_responsive(self.nodes[0])
        self._tally(result, published, end - start, seq_base)
        self.consumers.check()
        return result

    def _connect(self, workers: Workers, result: LevelResult) -> None:
        """Every node connects; the broker's memory before and after, settled."""
        # Before any connection: measured while the workers import (they are idle).
        result.mem_before = broker_memory(self.nodes)
        self.idle = self.idle or result.mem_before
        result.mem_idle = self.idle
        workers.gather("ready", 120)
        go = time.time()
        workers.send("connect")
        reports: list[ConnectReport] = workers.gather("connected", 1800)  # type: ignore[assignment]
        result.connected = sum(r.connected for r in reports)
        for r in reports:
            result.failures.update(r.failures)
        result.connect_s = max((r.last_connack for r in reports), default=go) - go
        result.connect_p99_ms = _percentile([ms for r in reports for ms in r.connect_ms], 0.99)
        meter = CpuMeter({"broker": self.beams})
        meter.start(1.0)
        began = time.monotonic()
        time.sleep(self.settings.settle)
        result.idle_cpu = meter.stop()["broker"] / max(0.1, time.monotonic() - began)
        result.mem_connected = broker_memory(self.nodes)
        self.consumers.check()

    def _tally(
        self, result: LevelResult, published: list[PublishReport], window: float, seq_base: int
    ) -> None:
        for p in published:
            result.sent += p.sent
            result.acked += p.acked
            result.unacked += p.unacked
            result.skipped += p.skipped
            result.dropped += p.dropped
            result.late += p.late
            result.max_late_s = max(result.max_late_s, p.max_late_s)
        result.acked_rate = sum(p.acked_in_window for p in published) / window
        by_round: dict[int, list[float]] = {}
        for p in published:
            for _node, seq, ms in p.acks:
                by_round.setdefault(seq - seq_base, []).append(ms)
        warmup = self.settings.warmup_rounds
        steady = [ms for k, v in by_round.items() if k >= warmup for ms in v]
        result.puback_p50 = _percentile(steady, 0.5)
        result.puback_p99 = _percentile(steady, 0.99)
        result.puback_rounds = {k: _percentile(v, 0.99) for k, v in sorted(by_round.items())}
        acked_keys = {(node, seq) for p in published for node, seq, _ms in p.acks}
        self._check_rows(result, acked_keys, seq_base)

    def _check_rows(self, result: LevelResult, acked: set[tuple[str, int]], seq_base: int) -> None:
        """Wait until every acknowledged reading is a row (or 30 s pass without progress)."""
        low, high = seq_base, seq_base + SEQ_STRIDE
        with psycopg.connect(self.pg.url(self.database), autocommit=True) as conn:
            last, last_change = -1, time.monotonic()
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM readings WHERE seq >= %s AND seq < %s", (low, high)
                ).fetchone()
                count = int(row[0]) if row else 0
                if count >= len(acked):
                    break
                if count != last:
                    last, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > 30:
                    break
                time.sleep(0.2)
            stored = {
                (str(node), int(seq))
                for node, seq in conn.execute(
                    "SELECT node, seq FROM readings WHERE seq >= %s AND seq < %s", (low, high)
                ).fetchall()
            }
            lat = conn.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d),"
                "       percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d)"
                "  FROM (SELECT extract(epoch FROM received_at - ts) * 1000 AS d"
                "          FROM readings WHERE seq >= %s AND seq < %s) x",
                (seq_base + self.settings.warmup_rounds, high),
            ).fetchone()
            rounds = conn.execute(
                "SELECT seq - %s, percentile_cont(0.99) WITHIN GROUP (ORDER BY"
                "       extract(epoch FROM received_at - ts) * 1000)"
                "  FROM readings WHERE seq >= %s AND seq < %s GROUP BY seq ORDER BY seq",
                (seq_base, low, high),
            ).fetchall()
        result.e2e_rounds = {int(k): float(v) for k, v in rounds}
        result.rows = len(stored)
        result.lost = len(acked - stored)
        result.extra = len(stored - acked)
        if lat is not None and lat[0] is not None:
            result.e2e_p50, result.e2e_p99, result.e2e_max = (float(x) for x in lat)


# -- output --------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:,.0f}"


def describe(r: LevelResult, base: LevelResult | None) -> str:
    fails = ", ".join(f"{v} {k}" for k, v in r.failures.most_common()) or "none"
    ratio = f" ({r.e2e_p99 / base.e2e_p99:.2f}x baseline)" if base and base is not r else ""
    cpu = ", ".join(f"{k} {v:.0%}" for k, v in r.cpu.items())
    rounds = " ".join(
        f"{k}:{_ms(r.puback_rounds.get(k, math.nan))}/{_ms(r.e2e_rounds.get(k, math.nan))}"
        for k in sorted(set(r.puback_rounds) | set(r.e2e_rounds))
    )
    return (
        f"{r.label}: {r.connected:,}/{r.n:,} connected in {r.connect_s:.1f} s "
        f"(CONNECT->CONNACK p99 {_ms(r.connect_p99_ms)} ms; failures: {fails}); broker CPU "
        f"connected and idle {r.idle_cpu:.0%}; "
        f"memory/conn {r.per_conn('total') / 1024:.0f} KiB ({r.per_conn('erlang') / 1024:.0f} "
        f"KiB erlang); {r.acked_rate:,.1f}/s acked of {r.offered:,.1f}/s offered; "
        f"PUBACK p50/p99 {_ms(r.puback_p50)}/{_ms(r.puback_p99)} ms; e2e p50/p99/max "
        f"{_ms(r.e2e_p50)}/{_ms(r.e2e_p99)}/{_ms(r.e2e_max)} ms{ratio}; sent {r.sent:,}, "
        f"acked {r.acked:,}, rows {r.rows:,}, lost {r.lost}, rows without a PUBACK "
        f"{r.extra}, unacked {r.unacked}, "
        f"not sent {r.skipped}, dropped connections {r.dropped}, late publishes {r.late} "
        f"(max {r.max_late_s * 1000:.0f} ms); CPU (of one core) {cpu}, load average "
        f"{r.load:.1f}; p99 by round "
        f"(PUBACK/e2e ms, from round 0, the warm-up rounds first): {rounds}; broker answering "
        f"again "
        f"{r.recover_s:.1f} s after the close"
    )


def table(results: list[LevelResult], base: LevelResult | None, settings: Settings) -> str:
    window = settings.measured_rounds * settings.interval
    strategy = results[0].mem_before.strategy if results and results[0].mem_before else "?"
    lines = [
        "",
        (
            f"Capacity: one reading per node every {settings.interval:g} s at QoS 1, steady "
            f"state {window:g} s per level after {settings.warmup_rounds} warm-up round(s), "
            f"{os.cpu_count()} cores"
        ),
        (
            f"memory: rabbitmqctl status memory.total ({strategy}; erlang alongside) with all "
            "connected and settled, minus before connecting (the lower of the level's and the "
            "idle broker's), per connection; mem MiB: the level's before -> connected"
        ),
        (
            "broker CPU: the broker's VM(s) on this host during the steady state, of one core; "
            "others CPU: the rest of the machine (not the bench, broker, pipeline, PostgreSQL)"
        ),
        "",
        (
            f"{'nodes':>8} {'conn ok':>8} {'failed':>7} {'connect':>8} {'mem MiB':>14} "
            f"{'KiB/conn':>9} {'erl KiB':>8} {'offer/s':>8} {'acked/s':>8} {'vs offer':>9} "
            f"{'PUBACK p99':>11} {'e2e p50':>8} {'e2e p99':>8} {'p99 vs base':>12} "
            f"{'lost':>5} {'unacked':>8} {'broker CPU':>11} {'others CPU':>11}"
        ),
    ]
    for r in results:
        assert r.mem_before is not None
        assert r.mem_connected is not None
        mem = f"{_mib(r.mem_before.total)}->{_mib(r.mem_connected.total)}"
        vs_base = f"{r.e2e_p99 / base.e2e_p99:.2f}x" if base else "-"
        lines.append(
            f"{r.label:>8} {r.connected:>8,} {r.failed:>7,} {r.connect_s:>7.1f}s {mem:>14} "
            f"{r.per_conn('total') / 1024:>9.0f} {r.per_conn('erlang') / 1024:>8.0f} "
            f"{r.offered:>8,.0f} {r.acked_rate:>8,.0f} {r.acked_rate / r.offered:>9.1%} "
            f"{_ms(r.puback_p99) + ' ms':>11} {_ms(r.e2e_p50) + ' ms':>8} "
            f"{_ms(r.e2e_p99) + ' ms':>8} {vs_base:>12} {r.lost:>5} {r.unacked:>8} "
            f"{r.cpu.get('broker', math.nan):>11.0%} {r.cpu.get('others', math.nan):>11.0%}"
        )
    levels = [r for r in results if r is not base]
    served = [r for r in levels if r.served]
    if served:
        best = max(served, key=lambda r: r.n)
        lines.append(
            f"sizing: {best.n:,} nodes per gateway: the largest level where every node "
            f"connected, nothing was lost or left unacknowledged, e2e p99 < "
            f"{P99_LIMIT_MS / 1000:g} s ({_ms(best.e2e_p99)} ms) and the rate matched the "
            f"offer (>= {RATE_MATCH:.0%}: {best.acked_rate / best.offered:.1%})"
        )
    else:
        lines.append("sizing: no level met every condition (see the table)")
    failing = [r for r in levels if not r.served]
    for r in failing:
        reasons = []
        if r.failed:
            reasons.append(f"{r.failed} connections failed")
        if r.lost or r.unacked or r.skipped or r.dropped:
            reasons.append(
                f"lost {r.lost}, unacked {r.unacked}, not sent {r.skipped}, dropped {r.dropped}"
            )
        if not r.e2e_p99 < P99_LIMIT_MS:
            reasons.append(f"p99 {_ms(r.e2e_p99)} ms")
        if not r.rate_matched:
            reasons.append(f"rate {r.acked_rate / r.offered:.1%} of the offer")
        lines.append(f"  {r.label} not served: {'; '.join(reasons)}")
    lines.extend(
        f"  note {r.label}: {r.late} publishes left the client more than 1 s late "
        "(the load generator lagged; the offer was not fully made)"
        for r in results
        if r.late
    )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------
def parse_levels(text: str) -> list[int]:
    levels = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive whole numbers: {text!r}")
    return levels


@contextlib.contextmanager
def _postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=parse_levels, default=parse_levels("1000,5000,10000"))
    parser.add_argument("--seconds", type=float, default=60, help="steady state per level")
    parser.add_argument("--target", choices=sorted(TARGETS), default="single")
    parser.add_argument("--baseline", type=int, default=100, help="nodes; 0: none")
    parser.add_argument("--interval", type=float, default=10, help="s between a node's readings")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--replicas", type=int, default=2, help="`pipeline consume` processes")
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--keepalive", type=int, default=60, help="as the agents' default")
    parser.add_argument("--settle", type=float, default=5, help="s after connecting")
    parser.add_argument("--user-batch", type=int, default=1000, help="users per users.sh call")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        interval=args.interval,
        seconds=args.seconds,
        warmup_rounds=args.warmup_rounds,
        workers=args.workers,
        concurrency=args.connect_concurrency,
        keepalive=args.keepalive,
        settle=args.settle,
    )
    levels: list[tuple[str, int]] = [(f"{n:,}", n) for n in args.levels]
    if args.baseline:
        levels.insert(0, (f"base {args.baseline}", args.baseline))
    most = max(n for _, n in levels)
    soft, hard = raise_fd_limit()
    print(f"file descriptors: {soft:,} (hard {hard:,}) for the bench and what it starts")

    with contextlib.ExitStack() as stack:
        # PostgreSQL boots while the broker does.
        with ThreadPoolExecutor(1) as pool:
            pg_future = pool.submit(lambda: stack.enter_context(_postgres()))
            nodes = stack.enter_context(TARGETS[args.target]())
            pg = pg_future.result()
        password = secrets.token_urlsafe(18)
        node_ids = [f"{NODE_PREFIX}-{i:05d}" for i in range(most)]
        # The users, the limits check and the database with its consumers, side by side.
        with ThreadPoolExecutor(2) as pool:
            users_took = pool.submit(make_users, nodes[0], node_ids, password, args.user_batch)
            limits = pool.submit(check_limits, nodes, most)
            database, _owner_url = pg.owned_database("capacity")
            consumers = Consumers(nodes, pg.role_url(database, "pipeline"), args.replicas)
            stack.callback(consumers.close)
            lines, beams = limits.result()
            print("\n".join(lines))
            wait_consuming(nodes[0], consumers, args.replicas)
            took = users_took.result()
        print(
            f"{most:,} node users by gateway/rabbitmq/users.sh, {args.user_batch:,} per import, "
            f"two at once: {took:.1f} s ({took / most * 1000:.1f} ms per user)",
            flush=True,
        )

        run = Run(nodes, node_ids, password, settings, pg, database, consumers, beams)
        results: list[LevelResult] = []
        base: LevelResult | None = None
        for index, (label, n) in enumerate(levels):
            result = run.level(label, n, index)
            if args.baseline and index == 0:
                base = result
            results.append(result)
            print(describe(result, base), flush=True)
        print(table(results, base, settings), flush=True)
        wait_responsive(nodes[0])
        dead, _ = queue_counts(nodes[0], "readings.dead")
        print(f"dead letters after the run: {dead} in readings.dead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
