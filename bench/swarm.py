"""A swarm of simulated edge nodes in one process: many MQTT connections on one event loop.

Run by bench/capacity.py in a few worker processes (multiprocessing), each driven through a
pipe, one step at a time, so the parent can measure the broker between the steps:

    worker -> ("ready",)
    parent -> ("connect",)                    every node connects (bounded concurrency)
    worker -> ("connected", ConnectReport)
    parent -> ("publish", t0, window_start, window_end)
    worker -> ("published", PublishReport)    every round sent, every PUBACK in (or timed out)
    parent -> ("close",)
    worker -> ("closed", DISCONNECTs sent)

Node ``i`` of ``n`` publishes round ``k`` at ``t0 + interval * (i / n + k)`` (wall clock, shared by
the processes): start times spread evenly over one interval, one reading per node per interval.
The payload is the one the agent sends (tempmon_contract.wire.reading_payload) with ``ts`` = the
moment it is written to the socket and ``seq`` = ``seq_base + k``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast

from bench.mqtt_lite import MqttConnection, MqttError, connect
from edge_agent.agent import mqtt_client_id
from tempmon_contract.ids import reading_topic
from tempmon_contract.wire import reading_payload

__all__ = ["ConnectReport", "PublishReport", "SwarmSpec", "run_worker"]

SENSOR = "s1"
LATE_S = 1.0  # a publish written this long after its slot counts as late (the client lagged)


@dataclass(frozen=True)
class SwarmSpec:
    """One worker's share of the nodes and the schedule they all follow."""

    nodes: list[tuple[str, str, int, int]]  # (node id, broker host, MQTT port, global index)
    total: int  # nodes in the whole level, over every worker
    password: str
    interval: float
    rounds: int
    seq_base: int
    keepalive: int
    concurrency: int
    connect_timeout: float
    ack_timeout: float


@dataclass
class ConnectReport:
    connected: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    began: float = 0.0  # wall clock
    last_connack: float = 0.0  # wall clock, of the last successful CONNACK
    connect_ms: list[float] = field(default_factory=list)


@dataclass
class PublishReport:
    sent: int = 0
    acked: int = 0
    acked_in_window: int = 0  # PUBACKs received inside [window_start, window_end)
    unacked: int = 0  # sent, no PUBACK by the end (the connection dropped, or the broker lagged)
    skipped: int = 0  # not sent: the node's connection was gone
    late: int = 0
    max_late_s: float = 0.0
    dropped: int = 0  # connections that ended without our DISCONNECT
    pings: int = 0
    acks: list[tuple[str, int, float]] = field(default_factory=list)  # (node, seq, PUBACK ms)


def run_worker(pipe: Connection, spec: SwarmSpec) -> None:
    """The worker process's entry point."""
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_Swarm(pipe, spec).run())


class _Swarm:
    def __init__(self, pipe: Connection, spec: SwarmSpec) -> None:
        self.pipe, self.spec = pipe, spec
        self.conns: dict[str, MqttConnection] = {}
        self.report = PublishReport()
        self.window = (0.0, 0.0)

    async def _recv(self) -> tuple[object, ...]:
        loop = asyncio.get_running_loop()
        message: tuple[object, ...] = await loop.run_in_executor(None, self.pipe.recv)
        return message

    async def run(self) -> None:
        self.pipe.send(("ready",))
        pinger: asyncio.Task[None] | None = None
        try:
            while True:
                command = await self._recv()
                if command[0] == "connect":
                    connected = await self._connect_all()
                    pinger = asyncio.create_task(self._keepalive(), name="keepalive")
                    self.pipe.send(("connected", connected))
                elif command[0] == "publish":
                    t0, start, end = (float(x) for x in command[1:4])  # type: ignore[arg-type]
                    self.window = (start, end)
                    await self._publish(t0)
                    self.pipe.send(("published", self.report))
                elif command[0] == "close":
                    closed = 0
                    for conn in self.conns.values():
                        if conn.open:
                            conn.disconnect()
                            closed += 1
                    await asyncio.sleep(0.5)  # let the DISCONNECTs leave
                    self.pipe.send(("closed", closed))
                    return
        finally:
            if pinger is not None:
                pinger.cancel()
            for conn in self.conns.values():
                conn.disconnect()

    # -- connecting ----------------------------------------------------------------------------
    async def _connect_all(self) -> ConnectReport:
        report = ConnectReport(began=time.time())
        gate = asyncio.Semaphore(self.spec.concurrency)

        async def one(node: str, host: str, port: int) -> None:
            async with gate:
                began = time.monotonic()
                try:
                    conn = await connect(
                        host,
                        port,
                        client_id=mqtt_client_id(node, secrets.token_hex(16)),
                        username=node,
                        password=self.spec.password,
                        keepalive=self.spec.keepalive,
                        on_ack=self._on_ack,
                        timeout=self.spec.connect_timeout,
                    )
                except MqttError as exc:
                    report.failures[exc.reason] += 1
                    return
                except TimeoutError:
                    report.failures["timeout"] += 1
                    return
                except OSError as exc:
                    report.failures[f"{type(exc).__name__}: {exc.strerror or exc}"] += 1
                    return
                report.connect_ms.append((time.monotonic() - began) * 1000)
                report.connected += 1
                report.last_connack = time.time()
                self.conns[node] = conn

        await asyncio.gather(*(one(node, host, port) for node, host, port, _ in self.spec.nodes))
        return report

    async def _keepalive(self) -> None:
        """PINGREQ on every connection idle for half its keepalive (the broker allows 1.5x)."""
        idle = self.spec.keepalive / 2
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            for conn in self.conns.values():
                if conn.ping_if_idle(idle, now):
                    self.report.pings += 1

    # -- publishing ----------------------------------------------------------------------------
    def _on_ack(self, seconds: float, tag: object) -> None:
        node, seq = cast("tuple[str, int]", tag)
        report = self.report
        report.acked += 1
        report.acks.append((node, seq, seconds * 1000))
        now = time.time()
        if self.window[0] <= now < self.window[1]:
            report.acked_in_window += 1

    async def _publish(self, t0: float) -> None:
        spec, report = self.spec, self.report
        slots = sorted(
            (t0 + spec.interval * (index / spec.total + k), k, node)
            for node, _host, _port, index in spec.nodes
            for k in range(spec.rounds)
        )
        for due, k, node in slots:
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            conn = self.conns.get(node)
            if conn is None or not conn.open:
                report.skipped += 1
                continue
            now = time.time()
            late = now - due
            report.max_late_s = max(report.max_late_s, late)
            if late > LATE_S:
                report.late += 1
            seq = spec.seq_base + k
            body = reading_payload(
                node=node, sensor=SENSOR, kind="simulated", seq=seq, ts=now, temperature_c=21.5
            )
            try:
                conn.publish(reading_topic(node, SENSOR), body, (node, seq))
            except MqttError:
                report.skipped += 1
                continue
            report.sent += 1
        deadline = time.monotonic() + spec.ack_timeout
        while time.monotonic() < deadline and any(
            c.inflight and c.open for c in self.conns.values()
        ):
            await asyncio.sleep(0.1)
        report.unacked = sum(len(c.inflight) for c in self.conns.values())
        report.dropped = sum(1 for c in self.conns.values() if c.lost)
