"""A three-node RabbitMQ cluster under faults: every reading taken is stored exactly once.

Two clusters, each configured by gateway/rabbitmq/cluster.conf and booted once for the module:
- ``native``: the installed RabbitMQ (3.10 on Debian 12), three nodes, each in a network
  namespace of its own with its own address (tests/harness/rabbit_cluster.py);
- ``compose``: docker-compose.yml + gateway/compose.cluster.yml run unmodified by ``docker
  compose`` on a private engine, RabbitMQ 4 (the rabbitmq:4-management stand-in).

For each cluster, one test runs the chain with real processes: three `edge-agent run`
processes (simulated sensors every 50 ms) given all three nodes in ``mqtt.hosts``, two
`pipeline consume` processes given all three AMQP URLs, and a private PostgreSQL. Three faults
are injected one after the other while readings flow, each measured and checked on the spot:
- kill -9 of the node that leads the ``readings`` queue (then it is started again);
- the node most agents publish through cut off from the other two for 30 s (blackhole routes
  both ways; the agents still reach it), then reconnected;
- a rolling restart of all three nodes, one after the other, each back in the cluster and in
  every quorum queue before the next.
Then the agents are stopped with SIGTERM (they flush), the queue drains, and every node's
sequence numbers are reconciled against ``readings``: all of ``first..top`` stored, none twice,
nothing dead-lettered, and the rollup's count equal to the rows.

"Back within seconds" is measured end to end: for each agent, the time from the fault until the
first reading it took after the fault is committed in PostgreSQL (``received_at``), which needs
the agent publishing on a live node and a consumer consuming. Each test prints its figures.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edge_agent.outbox import Outbox
from tests.conftest import Database
from tests.harness import NodeCredentials
from tests.harness.agent_proc import AgentProcess, outbox_state, write_config
from tests.harness.docker import DockerEngine
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import wait_for
from tests.harness.rabbit_cluster import Cluster, ComposeCluster, RabbitCluster

pytestmark = [pytest.mark.system, pytest.mark.slow]

AGENTS = 3
CONSUMERS = 2
INTERVAL_S = 0.05
# Every agent's first reading taken after the fault is committed within this many seconds.
# Measured (README, "A cluster of three"): a node killed, 2-5 s; a node cut off, 10-20 s (the
# cut is noticed after net_ticktime, 7.5-12.5 s); a rolling restart, under 5 s per node.
BACK_WITHIN_S = {"kill": 20.0, "cut": 45.0, "restart": 20.0}
CUT_S = 30.0


@pytest.fixture(scope="module", params=["native", "compose"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    began = time.monotonic()
    made: RabbitCluster | ComposeCluster
    keep = os.environ.get("KEEP_TEST_SERVICES") == "1"
    if request.param == "native":
        made = RabbitCluster(keep=keep)
    else:
        engine: DockerEngine = request.getfixturevalue("docker_engine")
        request.getfixturevalue("standins")
        made = ComposeCluster(engine, keep=keep)
    with made:
        print(f"{request.param} cluster formed in {time.monotonic() - began:.1f} s")
        yield made


_CONNECTED = re.compile(r"connected host=(\S+) port=(\d+)")


class ClusterChain:
    """Agents and consumers on every node of a cluster, and the reconciliation at the end."""

    def __init__(self, cluster: Cluster, database: Database, root: Path, tag: str) -> None:
        self.cluster = cluster
        self.database = database
        self.root = root
        self.nodes = [f"cl-{tag}-{n}" for n in range(1, AGENTS + 1)]
        self.creds: dict[str, NodeCredentials] = {}
        self.first: dict[str, int] = {}
        self.outboxes: dict[str, Path] = {}
        self.agents: dict[str, AgentProcess] = {}
        self.consumers: list[ConsumerProcess] = []

    def start(self) -> None:
        hosts = ", ".join(f'"{h}"' for h in self.cluster.mqtt_hosts())
        for node in self.nodes:
            creds = self.cluster.add_node(node)
            self.creds[node] = creds
            directory = self.root / node
            config = write_config(directory, self.cluster.any_node(), creds, interval_s=INTERVAL_S)
            text = config.read_text()
            text = re.sub(r'host = "[^"]*"\nport = \d+\n', f"hosts = [{hosts}]\n", text)
            assert "hosts = [" in text
            config.write_text(text)
            outbox = directory / "outbox.sqlite"
            Outbox(outbox).close()  # created here, so its seeded start is known
            self.first[node] = outbox_state(outbox)[1] + 1
            self.outboxes[node] = outbox
            self.agents[node] = AgentProcess(config)
        urls = ",".join(self.cluster.amqp_urls())
        for _ in range(CONSUMERS):
            self.consumers.append(
                ConsumerProcess(
                    self.cluster.any_node(),
                    self.database.writer_url,
                    batch_size=200,
                    prefetch=600,
                    batch_ms=100,
                    extra_env={"RABBITMQ_URL": urls},
                )
            )
        wait_for("readings from every agent", lambda: len(self.nodes_stored()) == AGENTS, 60)

    # -- observations ------------------------------------------------------------------------
    def _sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database.owner_url, autocommit=True) as conn:
            return list(conn.execute(query, params).fetchall())

    def nodes_stored(self) -> set[str]:
        return {str(r[0]) for r in self._sql("SELECT DISTINCT node FROM readings")}

    def agent_node(self, node: str) -> int | None:
        """The index of the cluster node the agent last said it connected to."""
        found = _CONNECTED.findall(self.agents[node].log)
        if not found:
            return None
        host, port = found[-1]
        for i, n in enumerate(self.cluster.nodes):
            if n.host == host and n.mqtt_port == int(port):
                return i
        return None

    def back_after(self, fault_at: float, timeout: float = 120) -> dict[str, float]:
        """Seconds from ``fault_at`` (epoch) until each agent's first reading taken after it
        was committed."""
        since = datetime.fromtimestamp(fault_at, UTC)

        def firsts() -> dict[str, float]:
            rows = self._sql(
                "SELECT node, min(received_at) FROM readings WHERE ts > %s GROUP BY node", since
            )
            return {str(n): (t.timestamp() - fault_at) for n, t in rows}

        wait_for("every agent's readings after the fault", lambda: len(firsts()) == AGENTS, timeout)
        return firsts()

    def flowing(self) -> None:
        """Wait until every agent has a reading taken from now on committed: the whole chain
        carries readings (rather than sleeping a fixed two seconds between faults)."""
        self.back_after(time.time())

    # -- the end -----------------------------------------------------------------------------
    def finish(self) -> None:
        wait_for(
            "every outbox drained",
            lambda: all(outbox_state(self.outboxes[n])[0] < 40 for n in self.nodes),
            90,
            0.25,
        )
        expected: dict[str, tuple[int, int]] = {}
        for node, agent in self.agents.items():
            code = agent.terminate(60)
            assert code == 0, f"{node}: edge-agent exited with {code}:\n{agent.log[-3000:]}"
            depth, top = outbox_state(self.outboxes[node])
            assert depth == 0, f"{node}: {depth} readings left in the outbox after SIGTERM"
            expected[node] = (self.first[node], top)
        taken = sum(top - first + 1 for first, top in expected.values())
        wait_for(
            f"all {taken} readings stored",
            lambda: self._sql("SELECT count(*) FROM readings")[0][0] >= taken,
            90,
            0.5,
        )
        for consumer in self.consumers:
            assert consumer.terminate(60) == 0, consumer.log[-3000:]
        stored: dict[str, set[int]] = {}
        for node, seq in self._sql("SELECT node, seq FROM readings"):
            stored.setdefault(str(node), set()).add(int(seq))
        rows, distinct = self._sql(
            "SELECT count(*), count(DISTINCT (node, sensor, seq)) FROM readings"
        )[0]
        rolled = self._sql("SELECT coalesce(sum(n), 0) FROM readings_minute")[0][0]
        for node, (first, top) in expected.items():
            missing = sorted(set(range(first, top + 1)) - stored.get(node, set()))
            assert not missing, f"{node}: {len(missing)} readings lost, first {missing[:10]}"
            extra = sorted(stored.get(node, set()) - set(range(first, top + 1)))
            assert not extra, f"{node}: readings nobody took: {extra[:10]}"
        assert rows == distinct == taken, (rows, distinct, taken)
        assert int(rolled) == rows, f"rollup counts {rolled}, the table {rows}"
        assert self.cluster.any_node().depth("readings.dead") == 0, "a reading dead-lettered"
        print(f"reconciled: {taken} readings taken by {AGENTS} agents, each stored once")

    def close(self, *, failed: bool) -> None:
        for agent in self.agents.values():
            if agent.alive():
                agent.kill()
        for consumer in self.consumers:
            if consumer.alive():
                consumer.kill()
        if failed:
            for node, agent in self.agents.items():
                print(f"--- agent {node} ---\n{agent.log[-3000:]}")
            for n, consumer in enumerate(self.consumers):
                print(f"--- consumer {n} ---\n{consumer.log[-3000:]}")
        for consumer in self.consumers:
            consumer.close()


@pytest.fixture
def chain(
    cluster: Cluster, database: Database, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ClusterChain]:
    tag = str(request.node.callspec.id)[:8]
    made = ClusterChain(cluster, database, tmp_path, tag)
    failed = True
    try:
        made.start()
        yield made
        failed = False
    finally:
        made.close(failed=failed)


def _report(what: str, back: dict[str, float], on_it: list[str], limit: float) -> None:
    figures = ", ".join(
        f"{node}{' (on it)' if node in on_it else ''} {seconds:.1f} s"
        for node, seconds in sorted(back.items())
    )
    print(f"{what}: each agent's first reading taken after it committed after {figures}")
    slow = {n: s for n, s in back.items() if s > limit}
    assert not slow, f"{what}: agents not back within {limit:.0f} s: {slow}"


def _kill9_of_the_leader(cluster: Cluster, chain: ClusterChain) -> None:
    leader = cluster.leader("readings")
    victim = cluster.nodes[leader]
    on_it = [n for n in chain.nodes if chain.agent_node(n) == leader]
    victim.kill()
    fault_at = time.time()  # the node is dead (kill waits until it is)
    print(f"killed {victim.nodename}, the leader of readings, {len(on_it)} agents on it")
    back = chain.back_after(fault_at)
    new_leader = cluster.leader("readings")
    assert new_leader != leader
    print(f"readings now led by {cluster.nodes[new_leader].nodename}")
    for node in on_it:
        assert chain.agent_node(node) not in (None, leader), f"{node} still on the dead node"
    _report("kill -9 of the leader", back, on_it, BACK_WITHIN_S["kill"])
    began = time.monotonic()
    victim.start()
    started = time.monotonic() - began
    cluster.wait_formed(180)
    print(
        f"{victim.nodename} started in {started:.1f} s, back in the cluster and every quorum "
        f"queue in {time.monotonic() - began:.1f} s"
    )


def _in_flight_to_the_others(node: Any) -> None:
    """Send 16 MiB from ``node`` to each other node right after the cut, as a busy node has
    data in flight when a cut comes: the blackholed links cannot deliver it, and a failed
    link's socket must not wait for it (gateway/rabbitmq/advanced.config). Left to wait, the
    socket outlived the cut; when the paused node restarted after the heal next to it and a
    new link to the same peer, RabbitMQ 3.10's management agent failed the restart (two
    sockets for one peer) and the node stayed paused for good."""
    node.ctl(
        "eval",
        "[erlang:send({rabbit_node_monitor, N}, {tempmon_test_in_flight, "
        "binary:copy(<<0>>, 16#1000000)}) || N <- nodes()], ok.",
    )


def _cut_off_for_30_s(cluster: Cluster, chain: ClusterChain) -> None:
    counts = [
        sum(1 for n in chain.nodes if chain.agent_node(n) == i) for i in range(len(cluster.nodes))
    ]
    index = max(range(len(counts)), key=lambda i: counts[i])
    target = cluster.nodes[index]
    on_it = [n for n in chain.nodes if chain.agent_node(n) == index]
    cluster.cut(index)
    fault_at = time.time()
    _in_flight_to_the_others(target)
    print(f"cut {target.nodename} off from the others, {len(on_it)} agents publishing through it")
    back = chain.back_after(fault_at)
    wait_for(
        "the agents of the cut-off node on the others",
        lambda: all(chain.agent_node(n) not in (None, index) for n in on_it),
        max(0.0, CUT_S - (time.time() - fault_at)) + 30,
    )
    print(f"its agents on other nodes {time.time() - fault_at:.1f} s after the cut")
    _report("a node cut off", back, on_it, BACK_WITHIN_S["cut"])
    time.sleep(max(0.0, CUT_S - (time.time() - fault_at)))
    # The node's links to the others failed at most about 12.5 s after the cut (net_ticktime),
    # so at least 17 s ago: their sockets must be gone, or the paused node's restart after the
    # heal may fail for good.
    left = cluster.links_to_the_others(index)
    assert not left, f"{target.nodename} still holds the failed cluster links to {left}"
    healed = time.monotonic()
    cluster.heal(index)
    cluster.wait_formed(180)
    print(f"{target.nodename} back in the cluster {time.monotonic() - healed:.1f} s after the cut")


def _rolling_restart(cluster: Cluster, chain: ClusterChain) -> None:
    for i, node in enumerate(cluster.nodes):
        on_it = [n for n in chain.nodes if chain.agent_node(n) == i]
        began = time.monotonic()
        node.stop()
        fault_at = time.time()  # the node is down (stop waits until it is)
        print(f"stopped {node.nodename}, {len(on_it)} agents on it")
        node.start()
        cluster.wait_formed(180)
        rejoined = time.monotonic() - began
        back = chain.back_after(fault_at)
        print(f"{node.nodename} restarted and back in every quorum queue in {rejoined:.1f} s")
        _report(f"restart of {node.nodename}", back, on_it, BACK_WITHIN_S["restart"])


@pytest.mark.timeout(1200)
def test_kill9_cut_off_and_rolling_restart_lose_nothing(
    cluster: Cluster, chain: ClusterChain
) -> None:
    """Under load: kill -9 of the node leading readings (then it comes back), the node most
    agents publish through cut off for 30 s (then reconnected), a rolling restart of all three;
    then every reading taken is stored exactly once."""
    for fault in (_kill9_of_the_leader, _cut_off_for_30_s, _rolling_restart):
        chain.flowing()
        began = time.monotonic()
        fault(cluster, chain)
        print(f"{fault.__name__.strip('_')}: {time.monotonic() - began:.1f} s")
    chain.flowing()
    chain.finish()
