"""The fault matrix: every reading a node took is stored once, or dead-lettered with a reason.

Each case runs the whole chain with real processes: `edge-agent run` processes (simulated
sensors sampled every 20 ms, each node with its own broker user and its own outbox), the
private RabbitMQ, `pipeline consume` processes and the private PostgreSQL. One fault is
injected while readings flow; then the agents are stopped with SIGTERM (they flush), the queue
drains, and for every node the sequence numbers it handed out are reconciled against
``readings`` and ``readings.dead``:

    seqs in readings | seqs in readings.dead == range(first, top + 1), with none in both,

where ``first`` is the outbox's seeded start + 1 (the test creates each outbox before its agent
starts, so the seed is known) and ``top`` is the highest sequence number the outbox ever handed
out (``sqlite_sequence``). ``readings`` must also hold no key twice, and the rollup's ``sum(n)``
must equal the row count.

The faults: consumers killed -9 mid-batch (one consumer three times; one of two; one of three),
the broker restarted and killed -9, PostgreSQL restarted and down for 8 s, agents killed -9
while the broker is down, the broker unreachable for about 20 s, a node that publishes every
reading twice, and an outbox whose disk fills up (a 256 KiB tmpfs, root only). In that last
case the broker first refuses the node, so its outbox holds readings when the disk fills; then
the broker takes it, the PUBACKs arrive on a full disk, and later space comes back.

Each case prints one line of counts; the module prints a summary table at the end (shown with
``-s`` or ``-rA``) and writes it to the file named by ``FAULT_MATRIX_REPORT`` if that is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.outbox import Outbox
from tempmon_contract.wire import reading_payload
from tests.conftest import Database
from tests.harness import NodeCredentials, RabbitBroker
from tests.harness.agent_proc import AgentProcess, outbox_state, write_config
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import wait_for

# Every fault runs against the native broker and against RabbitMQ 4 in its image.
pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.both_brokers]

NODES = ("fm-a", "fm-b", "fm-c")
TWICE_NODE = "fm-twice"
DISK_NODE = "fm-disk"
INTERVAL_S = 0.02  # each simulated sensor samples every 20 ms: 150 readings/s per node
TWICE_READINGS = 1500
OUTAGE_S = 20.0  # "the broker unreachable for a long while", kept short for CI
PROGRESS_TIMEOUT_S = 100.0  # covers the agents' and consumers' reconnect back-off (up to 60 s)

_DUPLICATES = re.compile(r"\bduplicates=(\d+)")
_DISK_FULL = "cannot store them in the outbox"  # logged once per episode


# --- results and the summary table --------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    broker: str = "native"
    nodes: int = 0
    taken: int = 0
    stored: int = 0
    dead: int = 0
    duplicates: int = 0
    lost_disk_full: int = 0
    seconds: float = 0.0
    outcome: str = "failed"
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"[{self.case}] broker={self.broker} nodes={self.nodes} taken={self.taken} "
            f"stored={self.stored} "
            f"dead={self.dead} duplicates_suppressed={self.duplicates} "
            f"lost_disk_full={self.lost_disk_full} seconds={self.seconds:.1f} "
            f"outcome={self.outcome} {'; '.join(self.notes)}"
        ).rstrip()


_COLUMNS = (
    "case",
    "broker",
    "nodes",
    "taken",
    "stored",
    "dead",
    "dup. suppressed",
    "lost (disk full)",
    "s",
    "outcome",
    "notes",
)


def _table(results: list[CaseResult]) -> str:
    rows = [
        (
            r.case,
            r.broker,
            str(r.nodes),
            str(r.taken),
            str(r.stored),
            str(r.dead),
            str(r.duplicates),
            str(r.lost_disk_full),
            f"{r.seconds:.0f}",
            r.outcome,
            "; ".join(r.notes),
        )
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(_COLUMNS)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [
        "Fault matrix: every reading taken is stored once or dead-lettered with a reason",
        fmt(_COLUMNS),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(fmt(row) for row in rows),
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def matrix() -> Iterator[list[CaseResult]]:
    results: list[CaseResult] = []
    yield results
    table = _table(results)
    print(f"\n{table}")
    target = os.environ.get("FAULT_MATRIX_REPORT")
    if target:
        Path(target).write_text(table + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def creds_by_broker() -> dict[int, dict[str, NodeCredentials]]:
    return {}


@pytest.fixture
def node_creds(
    rabbit: RabbitBroker, creds_by_broker: dict[int, dict[str, NodeCredentials]]
) -> dict[str, NodeCredentials]:
    """The nodes' broker users, created once per broker: users survive restarts and kills."""
    if id(rabbit) not in creds_by_broker:
        nodes = (*NODES, TWICE_NODE, DISK_NODE)
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:  # rabbitmqctl is slow to start
            creds_by_broker[id(rabbit)] = dict(
                zip(nodes, pool.map(rabbit.add_node, nodes), strict=True)
            )
    return creds_by_broker[id(rabbit)]


# --- the chain ----------------------------------------------------------------------------------


class Chain:
    """Agents, consumers and the reconciliation of one case."""

    def __init__(
        self,
        rabbit: RabbitBroker,
        database: Database,
        root: Path,
        creds: dict[str, NodeCredentials],
        result: CaseResult,
    ) -> None:
        self.rabbit = rabbit
        self.database = database
        self.root = root
        self.creds = creds
        self.result = result
        self.configs: dict[str, Path] = {}
        self.outboxes: dict[str, Path] = {}
        self.first: dict[str, int] = {}
        self.agents: dict[str, AgentProcess] = {}  # the current process of each node
        self.agent_runs: list[AgentProcess] = []  # every process ever started
        self.consumers: list[ConsumerProcess] = []  # every process ever started
        self.producers: dict[str, tuple[int, int]] = {}  # node -> (first, top), not agents
        self.agent_crashes: list[str] = []
        self.disk: Path | None = None  # the tiny tmpfs of the disk-full case
        self.disk_node = ""
        self._db: psycopg.Connection[tuple[Any, ...]] | None = None

    # -- agents --------------------------------------------------------------------------------
    def add_agent(self, node: str, outbox_dir: Path | None = None) -> AgentProcess:
        directory = self.root / node
        config = write_config(
            directory,
            self.rabbit,
            self.creds[node],
            interval_s=INTERVAL_S,
            seed_base=10 * len(self.configs),
        )
        outbox = directory / "outbox.sqlite"
        if outbox_dir is not None:
            moved = outbox_dir / "outbox.sqlite"
            text = config.read_text()
            assert f'path = "{outbox}"' in text
            config.write_text(text.replace(f'path = "{outbox}"', f'path = "{moved}"'))
            outbox = moved
        # Created here, so the seeded start (the first sequence number minus one) is known.
        Outbox(outbox).close()
        self.first[node] = outbox_state(outbox)[1] + 1
        self.configs[node] = config
        self.outboxes[node] = outbox
        return self.start_agent(node)

    def start_agent(self, node: str) -> AgentProcess:
        agent = AgentProcess(self.configs[node])
        self.agents[node] = agent
        self.agent_runs.append(agent)
        return agent

    def outbox(self, node: str) -> tuple[int, int]:
        return outbox_state(self.outboxes[node])

    def buffered(self) -> int:
        return sum(self.outbox(node)[0] for node in self.agents)

    # -- consumers -----------------------------------------------------------------------------
    def start_consumer(self) -> ConsumerProcess:
        # Batches of up to 200 deliveries or 200 ms: a kill always finds one being filled.
        consumer = ConsumerProcess(
            self.rabbit, self.database.writer_url, batch_size=200, prefetch=600, batch_ms=200
        )
        self.consumers.append(consumer)
        return consumer

    def live_consumers(self) -> list[ConsumerProcess]:
        return [c for c in self.consumers if c.alive()]

    # -- the database --------------------------------------------------------------------------
    def rows(self) -> int:
        """Rows in ``readings``, over one kept connection (polled every few milliseconds)."""
        for attempt in (1, 2):
            try:
                if self._db is None or self._db.closed:
                    self._db = psycopg.connect(self.database.owner_url, autocommit=True)
                row = self._db.execute("SELECT count(*) FROM readings").fetchone()
                return int(row[0]) if row else 0
            except psycopg.OperationalError:
                # PostgreSQL was restarted under the test: reconnect once.
                with contextlib.suppress(psycopg.Error):
                    if self._db is not None:
                        self._db.close()
                self._db = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def wait_progress(self, more: int, what: str, timeout: float = PROGRESS_TIMEOUT_S) -> None:
        """Wait until ``more`` new rows were stored: the chain works again after a fault."""
        target = self.rows() + more
        wait_for(f"{what}: {more} more rows", lambda: self.rows() >= target, timeout, 0.2)

    def wait_commit(self, timeout: float = 30) -> None:
        """Return right after a batch committed (rows changed): the next batch is in flight."""
        before = self.rows()
        wait_for("a commit", lambda: self.rows() != before, timeout, 0.005)

    # -- the end of a case ---------------------------------------------------------------------
    def finish(self) -> None:
        """Stop the agents (SIGTERM), drain everything, stop the consumers, reconcile."""
        wait_for(
            "every outbox drained by a connected agent",
            lambda: all(self.outbox(node)[0] < 40 for node in self.agents),
            PROGRESS_TIMEOUT_S,
            0.25,
        )
        # SIGTERM to every agent at once, then wait for each: they flush side by side.
        for agent in self.agents.values():
            agent.signal_terminate()
        for node, agent in self.agents.items():
            code = agent.proc.wait(60)
            assert code == 0, f"{node}: edge-agent exited with {code}:\n{agent.log[-3000:]}"
        expected = dict(self.producers)
        for node in self.agents:
            depth, top = self.outbox(node)
            assert depth == 0, f"{node}: {depth} readings left in the outbox after SIGTERM"
            expected[node] = (self.first[node], top)
        taken = sum(top - first + 1 for first, top in expected.values())
        self.result.nodes = len(expected)
        self.result.taken = taken
        self.result.lost_disk_full = sum(a.log.count(_DISK_FULL) for a in self.agent_runs)
        # Everything taken is in readings or readings.dead, and nothing is left unacknowledged.
        with contextlib.suppress(TimeoutError):  # the reconciliation below says what is missing
            wait_for(
                "every reading stored or dead-lettered",
                lambda: self.rows() + self.rabbit.depth("readings.dead") >= taken,
                90,
                0.25,
            )
        wait_for(
            "readings queue settled",
            lambda: self.rabbit.unacked("readings") == (0, 0),
            60,
            0.5,
        )
        live = self.live_consumers()
        for consumer in live:
            consumer.signal_terminate()
        for consumer in live:
            assert consumer.proc.wait(60) == 0, consumer.log[-3000:]
        self.result.duplicates = sum(
            int(n) for c in self.consumers for n in _DUPLICATES.findall(c.log)
        )
        self._reconcile(expected)

    def _reconcile(self, expected: dict[str, tuple[int, int]]) -> None:
        with psycopg.connect(self.database.owner_url) as conn:
            stored: dict[str, list[int]] = {}
            for node, seq in conn.execute("SELECT node, seq FROM readings"):
                stored.setdefault(str(node), []).append(int(seq))
            totals = conn.execute(
                "SELECT count(*), count(DISTINCT (node, sensor, seq)) FROM readings"
            ).fetchone()
            rolled = conn.execute("SELECT coalesce(sum(n), 0) FROM readings_minute").fetchone()
        assert totals is not None
        assert rolled is not None
        dead: dict[str, list[int]] = {}
        unattributed = 0
        for _, props, body in self.rabbit.drain("readings.dead"):
            reason = (props.headers or {}).get("x-reject-reason")
            assert reason, f"dead letter without a reason: {body[:200]!r}"
            try:
                doc = json.loads(body)
                dead.setdefault(str(doc["node"]), []).append(int(doc["seq"]))
            except (ValueError, KeyError, TypeError):
                unattributed += 1
        self.result.stored = int(totals[0])
        self.result.dead = sum(len(seqs) for seqs in dead.values()) + unattributed
        assert unattributed == 0, "dead letters that name no node and seq"
        assert set(stored) <= set(expected), f"rows of unknown nodes: {set(stored) - set(expected)}"
        assert set(dead) <= set(expected), f"dead letters of unknown nodes: {set(dead)}"
        for node, (first, top) in expected.items():
            got, rejected = stored.get(node, []), dead.get(node, [])
            got_set, rejected_set = set(got), set(rejected)
            assert len(got) == len(got_set), f"{node}: a sequence number stored twice"
            assert len(rejected) == len(rejected_set), f"{node}: a reading dead-lettered twice"
            both = got_set & rejected_set
            assert not both, f"{node}: stored and dead-lettered: {sorted(both)[:10]}"
            taken = set(range(first, top + 1))
            missing = sorted(taken - got_set - rejected_set)
            extra = sorted((got_set | rejected_set) - taken)
            assert not missing, f"{node}: {len(missing)} readings lost, first {missing[:10]}"
            assert not extra, f"{node}: readings nobody took: {extra[:10]}"
        rows, distinct = int(totals[0]), int(totals[1])
        assert rows == distinct, f"{rows - distinct} duplicate rows"
        assert int(rolled[0]) == rows, f"rollup counts {rolled[0]} readings, the table {rows}"
        assert self.rabbit.depth("node-status.dead") == 0, "a status message was dead-lettered"

    # -- clean-up ------------------------------------------------------------------------------
    def close(self, *, failed: bool) -> None:
        if self._db is not None:
            with contextlib.suppress(psycopg.Error):
                self._db.close()
        for agent in self.agent_runs:
            if agent.alive():
                agent.kill()
        for consumer in self.consumers:
            if consumer.alive():
                consumer.kill()
        if failed:
            for n, agent in enumerate(self.agent_runs):
                print(f"--- agent run {n} ({agent.config.parent.name}) ---\n{agent.log[-3000:]}")
            for n, consumer in enumerate(self.consumers):
                print(f"--- consumer {n} ---\n{consumer.log[-3000:]}")
        for consumer in self.consumers:
            consumer.close()


# --- the faults ---------------------------------------------------------------------------------
# Each fault function gets the chain with its agents and consumers running and readings flowing,
# injects its fault, checks what it can check on the spot and waits until the chain works again.


def _consumer_kill9_x3(chain: Chain) -> None:
    for n in range(3):
        chain.wait_commit()  # the next batch is being filled; the last ack may not be sent yet
        chain.live_consumers()[0].kill()
        time.sleep(0.5)  # readings keep queueing meanwhile
        chain.start_consumer()
        chain.wait_progress(300, f"after kill {n + 1}")
    chain.result.notes.append("killed 3 times, restarted each time")


def _kill_one_of(chain: Chain, total: int) -> None:
    for _ in range(total - 1):
        chain.start_consumer()
    chain.wait_progress(600, f"{total} consumers sharing the stream")
    chain.wait_commit()
    victim = chain.live_consumers()[1]
    victim.kill()
    chain.wait_progress(600, "the survivors take over")
    assert len(chain.live_consumers()) == total - 1
    chain.result.notes.append(f"{total - 1} of {total} consumers survived")


def _two_consumers_one_kill9(chain: Chain) -> None:
    _kill_one_of(chain, 2)


def _three_consumers_one_kill9(chain: Chain) -> None:
    _kill_one_of(chain, 3)


def _broker_outage(chain: Chain, fault: Callable[[], None], note: str) -> None:
    began = time.monotonic()
    fault()
    chain.result.notes.append(f"{note}, broker back after {time.monotonic() - began:.0f} s")
    chain.wait_progress(300, "after the broker came back")
    assert all(c.alive() for c in chain.consumers), "a consumer died with the broker"
    assert all("broker connection lost" in c.log for c in chain.consumers)


def _broker_restart(chain: Chain) -> None:
    _broker_outage(chain, chain.rabbit.restart, "orderly restart")


def _broker_kill9(chain: Chain) -> None:
    def kill_and_start() -> None:
        chain.rabbit.kill()
        chain.rabbit.start()

    _broker_outage(chain, kill_and_start, "kill -9")


def _postgres_restart(chain: Chain) -> None:
    chain.database.server.restart()
    chain.wait_progress(300, "after PostgreSQL restarted")
    assert all(c.alive() for c in chain.consumers)


def _postgres_down_8s(chain: Chain) -> None:
    server = chain.database.server
    server.stop("immediate")
    try:
        time.sleep(8)
        ready, unacked = chain.rabbit.unacked("readings")
        dead = chain.rabbit.depth("readings.dead")
        chain.result.notes.append(f"while down: ready={ready} unacked={unacked} dead={dead}")
        assert unacked > 0, "the consumer did not hold its batches while PostgreSQL was down"
        assert dead == 0, "readings were dead-lettered because PostgreSQL was down"
    finally:
        server.start()
    chain.wait_progress(300, "after PostgreSQL came back")
    assert all(c.alive() for c in chain.consumers)
    assert all("database unavailable" in c.log for c in chain.consumers)


def _agent_kill9_while_broker_down(chain: Chain) -> None:
    chain.rabbit.stop()
    time.sleep(3)  # the agents keep sampling into their outboxes
    tops = {}
    for node, agent in chain.agents.items():
        agent.kill()
        depth, tops[node] = chain.outbox(node)
        assert depth > 100, f"{node}: only {depth} readings buffered while the broker was down"
    buffered = sum(chain.outbox(node)[0] for node in chain.agents)
    chain.rabbit.start()
    for node in list(chain.agents):
        chain.start_agent(node)  # the same configuration: the outbox survived the kill
    chain.wait_progress(buffered, "the buffers of the killed agents arrive")
    for node, top in tops.items():
        assert chain.outbox(node)[1] > top, f"{node}: the restarted agent reused sequence numbers"
    chain.result.notes.append(f"{buffered} readings buffered at the kill")


def _broker_down_20s(chain: Chain) -> None:
    began = time.monotonic()
    chain.rabbit.stop()
    # Start again early enough that the broker is reachable again after about OUTAGE_S.
    boot = chain.rabbit.boot_seconds[-1] if chain.rabbit.boot_seconds else 10.0
    time.sleep(max(0.0, OUTAGE_S - boot - (time.monotonic() - began)))
    buffered = chain.buffered()
    assert buffered > 1000, f"only {buffered} readings buffered during the outage"
    assert all(a.alive() for a in chain.agents.values())
    chain.rabbit.start()
    outage = time.monotonic() - began
    chain.wait_progress(buffered, "the buffered readings arrive")
    chain.result.notes.append(f"unreachable {outage:.0f} s, {buffered} readings buffered")


def _publish_twice(rabbit: RabbitBroker, creds: NodeCredentials, count: int) -> None:
    """A node that publishes every reading twice (QoS 1 over MQTT), seq 1..count."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=creds.username, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(creds.username, creds.password)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", rabbit.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        wait_for("the duplicating node connected", client.is_connected, 10, 0.05)
        base = datetime.now(UTC) - timedelta(minutes=2)
        sent: list[mqtt.MQTTMessageInfo] = []
        for seq in range(1, count + 1):
            sensor = f"t{seq % 3}"
            body = reading_payload(
                node=creds.username,
                sensor=sensor,
                kind="simulated",
                seq=seq,
                ts=base + timedelta(milliseconds=20 * seq),
                temperature_c=20 + (seq % 50) / 10,
            )
            topic = f"sensors/{creds.username}/{sensor}"
            sent.extend(client.publish(topic, body, qos=1) for _ in range(2))
        for info in sent:
            info.wait_for_publish(60)
            assert info.is_published(), "the broker did not acknowledge a publish"
    finally:
        client.disconnect()
        client.loop_stop()


def _duplicate_publisher(chain: Chain) -> None:
    _publish_twice(chain.rabbit, chain.creds[TWICE_NODE], TWICE_READINGS)
    chain.producers[TWICE_NODE] = (1, TWICE_READINGS)
    chain.wait_progress(300, "after the duplicating node")
    chain.result.notes.append(f"{TWICE_NODE} sent {TWICE_READINGS} readings twice each")


def _refuse_disk_node(chain: Chain) -> None:
    """Until told otherwise the broker refuses the node (a wrong password): it only buffers."""
    chain.rabbit.add_node(DISK_NODE, secrets.token_urlsafe(12))


def _outbox_disk_full(chain: Chain) -> None:
    node = DISK_NODE
    agent = chain.agents[node]
    # Refused by the broker, the node buffers; its outbox's write-ahead log fills the disk.
    wait_for("the outbox disk is full", lambda: _DISK_FULL in agent.log, 30, 0.1)
    wait_for("the broker refused the node", lambda: "broker refused" in agent.log, 30, 0.1)
    time.sleep(2)  # the disk stays full; the node keeps sampling and counting its losses
    # The broker takes the node again: it sends its outbox and gets the PUBACKs, on a full disk.
    chain.rabbit.add_node(node, chain.creds[node].password)
    wait_for(
        "the node connected",
        lambda: "connected host" in agent.log or not agent.alive(),
        PROGRESS_TIMEOUT_S,
        0.2,
    )
    time.sleep(3)
    if not agent.alive():
        code = agent.proc.wait(10)
        chain.agent_crashes.append(node)
        chain.result.notes.append(f"PRODUCT BUG: {node} exited with {code} on the full disk")
    # Space comes back (an operator cleaned up); the agent must carry on by itself.
    subprocess.run(["mount", "-o", "remount,size=16m", str(chain.disk)], check=True)
    if node in chain.agent_crashes:
        chain.start_agent(node)  # as systemd would restart it: its outbox survived
    chain.wait_progress(600, "after space came back")


@dataclass(frozen=True)
class Fault:
    run: Callable[[Chain], None]
    nodes: tuple[str, ...] = NODES
    prepare: Callable[[Chain], None] | None = None  # before the agents start
    disk_full: bool = False  # the last node's outbox is on a tiny tmpfs


FAULTS = {
    "consumer_kill9_x3": Fault(_consumer_kill9_x3),
    "two_consumers_one_kill9": Fault(_two_consumers_one_kill9),
    "three_consumers_one_kill9": Fault(_three_consumers_one_kill9),
    "broker_restart": Fault(_broker_restart),
    "broker_kill9": Fault(_broker_kill9),
    "postgres_restart": Fault(_postgres_restart),
    "postgres_down_8s": Fault(_postgres_down_8s),
    "agent_kill9_while_broker_down": Fault(_agent_kill9_while_broker_down),
    "broker_down_20s": Fault(_broker_down_20s),
    "duplicate_publisher": Fault(_duplicate_publisher, nodes=NODES[:2]),
    "outbox_disk_full": Fault(
        _outbox_disk_full,
        nodes=(*NODES[:2], DISK_NODE),
        prepare=_refuse_disk_node,
        disk_full=True,
    ),
}


def _params() -> list[object]:
    return [pytest.param(name, id=name) for name in FAULTS]


@contextlib.contextmanager
def _tiny_disk(directory: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: the outbox's write-ahead log fills it within a second."""
    directory.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def servers(
    rabbit: RabbitBroker, database: Database, broker_kind: str
) -> tuple[RabbitBroker, Database, str]:
    """The running broker (queues purged), which one it is, and a fresh, migrated database."""
    return rabbit, database, broker_kind


@pytest.mark.parametrize("case", _params())
def test_fault(
    case: str,
    servers: tuple[RabbitBroker, Database, str],
    tmp_path: Path,
    node_creds: dict[str, NodeCredentials],
    matrix: list[CaseResult],
) -> None:
    rabbit, database, broker_kind = servers
    fault = FAULTS[case]
    if fault.disk_full and os.geteuid() != 0:
        pytest.skip("filling a disk needs a tmpfs mount, and mounting needs root")
    result = CaseResult(case, broker=broker_kind)
    matrix.append(result)
    began = time.monotonic()
    chain = Chain(rabbit, database, tmp_path, node_creds, result)
    try:
        _run_case(chain, fault)
        result.outcome = "ok"
        if fault.disk_full:
            _check_disk_full_reported(chain, database)
    except pytest.skip.Exception:
        result.outcome = "skipped"
        raise
    finally:
        result.seconds = time.monotonic() - began
        print(result.line())


def _run_case(chain: Chain, fault: Fault) -> None:
    failed = True
    with contextlib.ExitStack() as stack:
        if fault.disk_full:
            chain.disk = stack.enter_context(_tiny_disk(chain.root / "tiny-disk"))
            chain.disk_node = fault.nodes[-1]
        try:
            if fault.prepare is not None:
                fault.prepare(chain)
            chain.start_consumer()
            for node in fault.nodes:
                chain.add_agent(node, outbox_dir=chain.disk if node == chain.disk_node else None)
            chain.wait_progress(300, "readings flowing")
            fault.run(chain)
            chain.finish()
            failed = False
        finally:
            chain.close(failed=failed)


def _check_disk_full_reported(chain: Chain, database: Database) -> None:
    """The agent survived the full disk, said so in its log and counted its losses."""
    result = chain.result
    assert result.lost_disk_full > 0, "no reading was reported lost to the full disk"
    with psycopg.connect(database.owner_url) as conn:
        row = conn.execute(
            "SELECT dropped FROM nodes WHERE node = %s", (chain.disk_node,)
        ).fetchone()
    dropped = None if row is None else row[0]
    result.notes.append(f"heartbeat dropped={dropped}")
    if isinstance(dropped, int):
        result.lost_disk_full = dropped  # the node's own count, not its log's
    if chain.agent_crashes:
        result.outcome = "ok (data), agent crashed: xfail"
    assert not chain.agent_crashes, "edge-agent crashed when its outbox disk was full"
    assert isinstance(dropped, int), "no heartbeat with a dropped count arrived"
    assert dropped > 0, "the heartbeat did not count the readings lost to the full disk"
