"""A three-node RabbitMQ cluster on one machine, each node a host of its own on a private network.

Each node runs the installed server (Debian's RabbitMQ) in a network namespace of its own,
joined to a bridge on the host: it has its own address (``node.host``), its own epmd and the
standard ports, and is named ``rabbit@<its address>`` (long names), so the nodes find each other
as separate hosts would. Each loads gateway/rabbitmq/rabbitmq.conf, then cluster.conf, then a
file that names this cluster's nodes in place of compose's hostnames and points the definitions
at the repository's file. Users come from gateway/rabbitmq/users.sh and every node is made a
member of every quorum queue by gateway/rabbitmq/cluster.sh, as gateway/rabbitmq/start.sh does.

The tests reach the nodes from the host over the bridge. ``cut(i)`` cuts node ``i`` off from the
other nodes (blackhole routes in each namespace, both ways) while the host, and so every client,
still reaches it; ``heal(i)`` undoes it. ``nodes[i].kill()`` is kill -9 of the whole node,
``stop()`` an orderly shutdown, ``start()`` brings it back with its data.

Needs root (namespaces, a bridge) and ``ip`` from iproute2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.harness.compose_env import compose_env_file
from tests.harness.docker import DockerEngine
from tests.harness.procs import REPO, host_lock, mine, wait_for
from tests.harness.rabbit import GATEWAY, RABBIT_BIN, NodeCredentials, RabbitBroker

__all__ = [
    "QUEUES",
    "Cluster",
    "ClusterNode",
    "ComposeCluster",
    "ComposeNode",
    "RabbitCluster",
    "free_subnet",
]

QUEUES = ("readings", "node-status", "readings.dead", "node-status.dead")
_NODE_NAME = re.compile(r"rabbit@[A-Za-z0-9._-]+")
_PEER = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def free_subnet() -> str:
    """A /24 prefix ("10.214.N") that no address or route of the host uses, among this xdist
    worker's share (another worker may be between picking one and adding its bridge)."""
    used = _ip("-o", "-4", "route", "show", "table", "all") + _ip("-o", "-4", "addr")
    for third in range(16, 250):
        net = f"10.214.{third}"
        if mine(third) and f"{net}." not in used:
            return net
    raise RuntimeError("no free 10.214.x.0/24 subnet for the cluster's bridge")


class Cluster:
    """What every cluster of the tests offers, whatever runs its nodes.

    ``nodes`` are ``RabbitBroker``s (``host``, ports, ``ctl()``, ``kill()``, ``stop()``,
    ``start()``) that also have ``peer_address`` and ``ip_command()``.
    """

    nodes: list[Any]
    admin: NodeCredentials
    pipeline: NodeCredentials

    def __init__(self) -> None:
        self._cut: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except Exception:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- partitions --------------------------------------------------------------------------
    def cut(self, index: int) -> None:
        """Cut node ``index`` off from the other nodes, both ways (blackhole routes in every
        node's network namespace); clients on the host still reach it. Everything is looked
        up first, so the routes go in within milliseconds of each other."""
        self._routes("add", index, check=True)
        self._cut.add(index)

    def heal(self, index: int) -> None:
        """Undo :meth:`cut`."""
        self._routes("del", index, check=False)
        self._cut.discard(index)

    def _routes(self, verb: str, index: int, *, check: bool) -> None:
        prefixes = [n.ip_command() for n in self.nodes]
        addresses = [n.peer_address for n in self.nodes]
        pairs = [(index, j) for j in range(len(self.nodes)) if j != index]
        for me, other in pairs + [(j, i) for i, j in pairs]:
            argv = [*prefixes[me], "route", verb, "blackhole", f"{addresses[other]}/32"]
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
            if check and done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")

    # -- state -------------------------------------------------------------------------------
    def running_nodes(self, via: int = 0) -> set[str]:
        """The names of the running nodes, as node ``via`` sees them."""
        out = self.nodes[via].ctl("cluster_status", "--formatter", "json")
        return {str(name) for name in json.loads(out).get("running_nodes", [])}

    def links_to_the_others(self, index: int) -> list[str]:
        """The TCP sockets (``address:port`` of the peer) that node ``index``'s Erlang VM
        holds to the other nodes' addresses: its cluster links, live or not yet closed.
        Answers while the node is paused too (``eval`` needs the VM, not the rabbit app)."""
        out = self.nodes[index].ctl(
            "eval",
            'lists:flatten([io_lib:format("~s:~b ", [inet:ntoa(A), Port]) '
            '|| P <- erlang:ports(), erlang:port_info(P, name) =:= {name, "tcp_inet"}, '
            "{ok, {A, Port}} <- [inet:peername(P)]]).",
        )
        others = {n.peer_address for i, n in enumerate(self.nodes) if i != index}
        return [peer for peer in _PEER.findall(out) if peer.rsplit(":", 1)[0] in others]

    def wait_formed(self, timeout: float = 120) -> None:
        """Every node running and in one cluster, every quorum queue with every node online."""
        names = {n.nodename for n in self.nodes}

        def replicated() -> bool:
            # One listing from one node answers for every queue (each rabbitmqctl call starts
            # an Erlang VM: a second or more).
            members = self._all_queue_info()
            return all(
                set(_NODE_NAME.findall(members.get(q, {}).get("online", ""))) == names
                for q in QUEUES
            )

        def formed() -> bool:
            return all(self.running_nodes(i) == names for i in range(len(self.nodes)))

        wait_for("every quorum queue on every node", lambda: _quietly(replicated), timeout, 0.5)
        try:
            wait_for("all nodes running in one cluster", lambda: _quietly(formed), timeout, 0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; each node's view: {self._views()}") from None

    def _views(self) -> str:
        """What each node says of the cluster (running nodes, partitions), for a failure."""
        views = []
        for i, node in enumerate(self.nodes):
            try:
                status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
                views.append(
                    f"{node.nodename}: running={sorted(status.get('running_nodes', []))} "
                    f"partitions={status.get('partitions')} alarms={status.get('alarms')}"
                )
            except Exception as exc:  # noqa: BLE001 - a diagnosis; the timeout is the error
                views.append(f"node {i}: cluster_status failed: {exc!r}"[:300])
        return "; ".join(views)

    def _reachable(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.running and i not in self._cut]

    def _all_queue_info(self, via: int | None = None) -> dict[str, dict[str, str]]:
        """name -> {leader, members, online} of every queue, from one node."""
        last: Exception | None = None
        for i in [via] if via is not None else self._reachable():
            try:
                out = self.nodes[i].ctl(
                    "list_queues", "--no-table-headers", "name", "leader", "members", "online"
                )
            except RuntimeError as exc:
                last = exc
                continue
            info: dict[str, dict[str, str]] = {}
            for line in out.splitlines():
                fields = line.split("\t")
                if len(fields) == 4:
                    name, leader, members, online = fields
                    info[name] = {"leader": leader, "members": members, "online": online}
            return info
        raise RuntimeError(f"no running node lists the queues: {last}")

    def _queue_info(self, queue: str, via: int | None = None) -> dict[str, str]:
        info = self._all_queue_info(via)
        if queue not in info:
            raise RuntimeError(f"no queue {queue} listed")
        return info[queue]

    def leader(self, queue: str = "readings") -> int:
        """The index of the node that leads ``queue`` now."""
        name = self._queue_info(queue)["leader"]
        for i, node in enumerate(self.nodes):
            if node.nodename == name:
                return i
        raise RuntimeError(f"queue {queue} is led by {name!r}, not a node of this cluster")

    def online_members(self, queue: str, via: int | None = None) -> set[str]:
        info = self._queue_info(queue, via)
        return set(_NODE_NAME.findall(info.get("online", "")))

    def any_node(self) -> Any:
        """A running node that is not cut off (for users, queue depths, draining)."""
        for i in self._reachable():
            return self.nodes[i]
        raise RuntimeError("no node is running")

    def add_node(self, node_id: str, password: str | None = None) -> NodeCredentials:
        """A node's MQTT user (users are cluster-wide: made once, through any node)."""
        return self.any_node().add_node(node_id, password)  # type: ignore[no-any-return]

    # -- what clients are given --------------------------------------------------------------
    def mqtt_hosts(self) -> list[str]:
        """The agent's ``mqtt.hosts``: every node, ``host:port``."""
        return [f"{n.host}:{n.mqtt_port}" for n in self.nodes]

    def amqp_urls(self, creds: NodeCredentials | None = None) -> list[str]:
        return [str(n.amqp_url(creds)) for n in self.nodes]


def _quietly(check: Callable[[], bool]) -> bool:
    """``check()``, false where a node cannot answer yet."""
    try:
        return check()
    except (RuntimeError, subprocess.TimeoutExpired, ValueError):
        return False


class ClusterNode(RabbitBroker):
    """One node of :class:`RabbitCluster`: a ``RabbitBroker`` in its own network namespace."""

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.netns = f"{cluster.prefix}-{index + 1}"
        super().__init__(keep=cluster.keep)
        # One administrator and one pipeline account for the whole cluster (users are
        # cluster-wide; every node's start applies the same ones, as every compose node does).
        self.admin = cluster.admin
        self.pipeline = cluster.pipeline

    def _assign_addresses(self) -> None:
        # The node's own address on the cluster's bridge, and the standard ports: it is a host.
        self.host = f"{self.cluster.subnet}.{self.index + 2}"
        self.amqp_port = 5672
        self.mqtt_port = 1883
        self.management_port = 15672
        self.prometheus_port = 15692
        self.mqtt_tls_port = 8883
        self.dist_port = 25672
        self.epmd_port = 4369
        self.nodename = f"rabbit@{self.host}"

    def _write_config(self) -> None:
        conf_d = self.dir / "conf.d"
        conf_d.mkdir()
        (conf_d / "10-gateway.conf").symlink_to(GATEWAY / "rabbitmq.conf")
        (conf_d / "30-cluster.conf").symlink_to(GATEWAY / "cluster.conf")
        if self.cluster.nodes_conf is not None:
            # A node list rendered elsewhere (the Ansible gateway role), in place of the tests'.
            (conf_d / "80-nodes.conf").symlink_to(self.cluster.nodes_conf)
        else:
            (conf_d / "80-nodes.conf").write_text(
                "".join(
                    f"cluster_formation.classic_config.nodes.{i + 1} = "
                    f"rabbit@{self.cluster.subnet}.{i + 2}\n"
                    for i in range(self.cluster.size)
                )
            )
        (conf_d / "90-test-cluster.conf").write_text(
            "\n".join(
                [
                    f"definitions.local.path = {GATEWAY / 'definitions.json'}",
                    # The UI and the Prometheus endpoint on the node's address only.
                    f"management.tcp.ip = {self.host}",
                    f"prometheus.tcp.ip = {self.host}",
                    "",
                ]
            )
        )
        (self.dir / "rabbitmq-env.conf").write_text("")
        # The cluster's shared Erlang cookie, as start.sh writes RABBITMQ_CLUSTER_COOKIE.
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(self.cluster.cookie)
        cookie.chmod(0o400)

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(
            RABBITMQ_USE_LONGNAME="true",
            ERL_EPMD_ADDRESS=self.host,
            RABBITMQ_QUEUES=f"{RABBIT_BIN}/rabbitmq-queues",
        )
        return env

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    @property
    def peer_address(self) -> str:
        """The address the other nodes reach this one at."""
        return self.host

    def ip_command(self) -> list[str]:
        """The ``ip`` command line that acts in this node's network namespace."""
        return ["ip", "-n", self.netns]

    def start(self, timeout: float = 120) -> None:
        super().start(timeout)
        # As start.sh does on every start of a cluster node.
        self._run(["sh", str(GATEWAY / "cluster.sh"), "replicas"], None)

    def queues(self, *args: str) -> str:
        return self._run([f"{RABBIT_BIN}/rabbitmq-queues", "-q", *args], None)


class RabbitCluster(Cluster):
    """Three (``size``) RabbitMQ nodes clustered by gateway/rabbitmq/cluster.conf."""

    def __init__(
        self,
        size: int = 3,
        *,
        keep: bool = False,
        subnet: str | None = None,
        nodes_conf: Path | None = None,
        cookie: str | None = None,
    ) -> None:
        """``subnet`` ("10.214.N", default: a free one) gives node ``i`` the address
        ``<subnet>.<i + 2>``; ``nodes_conf`` is a file naming the nodes
        (``cluster_formation.classic_config.nodes.N = rabbit@<address>``) loaded after
        cluster.conf instead of the one the harness writes; ``cookie`` the Erlang cookie."""
        if os.geteuid() != 0:
            raise RuntimeError("a cluster of network namespaces needs root")
        self.size = size
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="tempmon-cluster-"))
        tag = secrets.token_hex(3)
        self.prefix = f"tmrq{tag}"
        self.bridge = f"tmrqb{tag}"
        self.subnet = subnet or ""
        self.nodes_conf = nodes_conf
        self.cookie = cookie or secrets.token_hex(20)
        self.admin = NodeCredentials("admin", secrets.token_urlsafe(12))
        self.pipeline = NodeCredentials("pipeline", secrets.token_urlsafe(12))
        super().__init__()
        self._network_up = False
        self.nodes: list[ClusterNode] = []
        try:
            # Picking a free subnet and taking it (the bridge's address) is one step for
            # every process on this host.
            with host_lock("subnets"):
                self.subnet = self.subnet or free_subnet()
                self._make_network()
            self.nodes = [ClusterNode(self, i) for i in range(size)]
        except Exception:
            self.close()
            raise

    # -- network -----------------------------------------------------------------------------
    def _make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._network_up = True
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.size):
            ns = f"{self.prefix}-{i + 1}"
            host_end, ns_end = f"{self.prefix}h{i + 1}", f"{self.prefix}n{i + 1}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("link", "set", ns_end, "netns", ns)
            _ip("addr", "add", f"{self.subnet}.{i + 2}/24", "dev", ns_end, netns=ns)
            _ip("link", "set", ns_end, "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        """Boot the first node, then the others (they join it by peer discovery), and wait
        until every node runs in one cluster and every quorum queue has every node."""
        self.nodes[0].start(timeout)
        # The others together: each joins the first.
        with ThreadPoolExecutor(len(self.nodes) - 1 or 1) as pool:
            for done in [pool.submit(node.start, timeout) for node in self.nodes[1:]]:
                done.result()
        self.wait_formed(timeout)

    def close(self) -> None:
        """Stop every node, remove the namespaces, the bridge and the temp dir."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
        if self._network_up:
            for i in range(self.size):
                _ip("netns", "delete", f"{self.prefix}-{i + 1}", check=False)
            _ip("link", "delete", self.bridge, check=False)
            self._network_up = False
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the compose cluster: gateway/compose.cluster.yml on a private Docker Engine -------------

_SERVICES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")


class ComposeNode(RabbitBroker):
    """One service of gateway/compose.cluster.yml, with the interface of ``RabbitBroker``.

    ``kill()`` is ``docker compose kill -s KILL``, ``stop()`` ``docker compose stop`` (SIGTERM to
    start.sh, an orderly shutdown), ``start()`` ``docker compose start`` with its volume. Clients
    reach it on its published ports on 127.0.0.1; the other nodes at its address on the
    project's network.
    """

    def __init__(self, cluster: ComposeCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.service = _SERVICES[index]
        super().__init__(keep=cluster.keep)
        self.admin = cluster.admin
        self.pipeline = cluster.pipeline

    def _assign_addresses(self) -> None:
        suffix = "" if self.index == 0 else f"_{self.index + 1}"
        settings = self.cluster.settings
        self.host = "127.0.0.1"
        self.amqp_port = int(settings[f"AMQP_PORT{suffix}"])
        self.mqtt_port = int(settings[f"MQTT_PORT{suffix}"])
        self.management_port = int(settings[f"RABBITMQ_UI_PORT{suffix}"])
        self.prometheus_port = self.mqtt_tls_port = self.dist_port = self.epmd_port = 0
        self.nodename = f"rabbit@{self.service}"

    def _write_config(self) -> None:
        """Nothing to write: compose mounts gateway/'s files."""

    def _container(self) -> dict[str, Any]:
        ids = self.cluster.compose("ps", "--all", "--quiet", self.service).split()
        if not ids:
            return {}
        out = self.cluster.engine.docker("inspect", ids[0], timeout=60).stdout
        return dict(json.loads(out)[0])

    @property
    def running(self) -> bool:
        return bool(self._container().get("State", {}).get("Running"))

    @property
    def peer_address(self) -> str:
        networks = self._container()["NetworkSettings"]["Networks"]
        return str(next(iter(networks.values()))["IPAddress"])

    def ip_command(self) -> list[str]:
        """The host's ``ip`` in the container's network namespace (the image has none)."""
        return ["nsenter", "-t", str(self._container()["State"]["Pid"]), "-n", "ip"]

    def start(self, timeout: float = 180) -> None:
        if self.running:
            return
        began = time.monotonic()
        self.cluster.compose("start", self.service, timeout=timeout)
        self.wait_ready(timeout)
        self.boot_seconds.append(time.monotonic() - began)

    def wait_ready(self, timeout: float = 180) -> None:
        """start.sh has applied users (and replicas), and AMQP answers."""

        def ready() -> bool:
            done = self.cluster.run(
                "exec", "-T", self.service, "test", "-f", "/tmp/gateway-users-applied"
            )
            if done.returncode != 0:
                return False
            with contextlib.suppress(Exception), contextlib.closing(self.connection()):
                return True
            return False

        wait_for(f"{self.service} up with its users", ready, timeout, interval=1)

    def stop(self, timeout: float = 60) -> None:
        self.cluster.compose("stop", "--timeout", str(int(timeout)), self.service)

    def kill(self) -> None:
        self.cluster.compose("kill", "--signal", "KILL", self.service)
        wait_for(f"{self.service} dead", lambda: not self.running, 30)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def ctl(self, *args: str, input_text: str | None = None) -> str:
        return self._exec(["rabbitmqctl", "-q", *args], input_text)

    def queues(self, *args: str) -> str:
        return self._exec(["rabbitmq-queues", "-q", *args], None)

    def users(self, *args: str, input_text: str | None = None) -> str:
        return self._exec(["sh", "/etc/rabbitmq/gateway/users.sh", *args], input_text)

    def _exec(self, argv: list[str], input_text: str | None) -> str:
        done = self.cluster.run(
            "exec", "-T", "--user", "rabbitmq", self.service, *argv, input_text=input_text
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stderr}")
        return done.stdout


class ComposeCluster(Cluster):
    """The three RabbitMQ services of docker-compose.yml + gateway/compose.cluster.yml, run
    unmodified by ``docker compose`` on a private engine with the stand-in images."""

    def __init__(self, engine: DockerEngine, *, keep: bool = False) -> None:
        super().__init__()
        self.engine = engine
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="tempmon-compose-cluster-"))
        self.project = f"tmcluster{secrets.token_hex(3)}"
        self.env_file, self.settings = compose_env_file(self.dir)
        self.admin = NodeCredentials(
            self.settings["RABBITMQ_ADMIN_USER"], self.settings["RABBITMQ_ADMIN_PASSWORD"]
        )
        self.pipeline = NodeCredentials(
            self.settings["PIPELINE_AMQP_USER"], self.settings["PIPELINE_AMQP_PASSWORD"]
        )
        self.nodes: list[ComposeNode] = [ComposeNode(self, i) for i in range(len(_SERVICES))]

    def run(
        self, *args: str, timeout: float = 300, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "docker",
                "compose",
                "--project-name",
                self.project,
                "--env-file",
                str(self.env_file),
                "-f",
                "docker-compose.yml",
                "-f",
                "gateway/compose.cluster.yml",
                *args,
            ],
            cwd=REPO,
            env=self.engine.env(),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def compose(self, *args: str, timeout: float = 300) -> str:
        done = self.run(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"docker compose {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout

    def start(self, timeout: float = 300) -> None:
        """``docker compose up`` of the three nodes (rabbitmq first: the others wait for it to
        be healthy, then join it), and wait until the cluster is whole."""
        try:
            self.compose("up", "--detach", "--wait", *_SERVICES, timeout=timeout)
            for node in self.nodes:
                node.wait_ready(timeout)
            self.wait_formed(timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- the nodes' logs ---\n{self.logs()[-6000:]}") from exc

    def logs(self) -> str:
        return self.run("logs", "--tail", "60", *_SERVICES).stdout

    def close(self) -> None:
        self.run("down", "--volumes", "--timeout", "30", timeout=300)
        for node in self.nodes:
            node.close()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
