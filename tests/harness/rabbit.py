"""A private RabbitMQ node configured by gateway/rabbitmq/ itself."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import pika

from tests.harness.procs import REPO, free_port, kill_group, port_open, wait_for

GATEWAY = REPO / "gateway" / "rabbitmq"
RABBIT_BIN = os.environ.get("RABBITMQ_BIN_DIR", "/usr/lib/rabbitmq/bin")


@dataclass(frozen=True)
class NodeCredentials:
    """A node's MQTT account, as Ansible would create it on the gateway."""

    username: str
    password: str


class RabbitBroker:
    """One RabbitMQ node in a temp directory on free ports.

    The node loads gateway/rabbitmq/rabbitmq.conf first and then a small override file that
    moves every listener to a free port and points the definitions at the repository's file;
    its plugins come from gateway/rabbitmq/enabled_plugins. Users are created by
    gateway/rabbitmq/users.sh, as in docker compose.

    It runs ``/usr/lib/rabbitmq/bin/rabbitmq-server`` directly: the ``/usr/sbin`` wrapper would
    switch to the system ``rabbitmq`` user and its cookie. ``HOME`` points into the temp dir so
    the node and rabbitmqctl share a private Erlang cookie, and the node gets its own epmd.
    """

    def __init__(self, *, keep: bool = False, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tempmon-rabbit-"))
        self.keep = keep
        # With TLS on, the node loads gateway/rabbitmq/tls.conf too: MQTT over TLS only, as
        # docker compose with gateway/compose.tls.yml runs it (plain MQTT closed).
        self.tls = tls
        self._assign_addresses()
        self.admin = NodeCredentials("admin", secrets.token_urlsafe(12))
        self.pipeline = NodeCredentials("pipeline", secrets.token_urlsafe(12))
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "server.out"
        self.tls_dir = self.dir / "tls"
        self.boot_seconds: list[float] = []
        self._write_config()

    # -- configuration -------------------------------------------------------------------
    def _assign_addresses(self) -> None:
        """Free ports on 127.0.0.1 and a node name of its own (a cluster node differs)."""
        # The address clients use to reach this node.
        self.host = "127.0.0.1"
        self.amqp_port = free_port()
        self.mqtt_port = free_port()
        self.management_port = free_port()
        self.prometheus_port = free_port()
        self.mqtt_tls_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"tempmon-test-{os.getpid()}-{self.amqp_port}@localhost"

    def _write_config(self) -> None:
        conf_d = self.dir / "conf.d"
        conf_d.mkdir()
        # The deployed file itself, first; then this node's ports (later files win).
        (conf_d / "10-gateway.conf").symlink_to(GATEWAY / "rabbitmq.conf")
        (conf_d / "90-test-ports.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
                    f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}",
                    f"management.tcp.port = {self.management_port}",
                    "management.tcp.ip = 127.0.0.1",
                    f"prometheus.tcp.port = {self.prometheus_port}",
                    "prometheus.tcp.ip = 127.0.0.1",
                    f"definitions.local.path = {GATEWAY / 'definitions.json'}",
                    "",
                ]
            )
        )
        if self.tls:
            # MQTT over TLS, from gateway/rabbitmq/tls.conf with certificates made by
            # gateway/tls/make-certs.sh, as an operator would.
            self._make_certs()
            broker = self.tls_dir / "broker"
            (conf_d / "20-tls.conf").symlink_to(GATEWAY / "tls.conf")
            (conf_d / "91-test-tls.conf").write_text(
                "\n".join(
                    [
                        f"mqtt.listeners.ssl.default = 127.0.0.1:{self.mqtt_tls_port}",
                        f"ssl_options.cacertfile = {broker / 'ca.pem'}",
                        f"ssl_options.certfile = {broker / 'server.pem'}",
                        f"ssl_options.keyfile = {broker / 'server.key'}",
                        "",
                    ]
                )
            )
        (self.dir / "rabbitmq-env.conf").write_text("")

    def _make_certs(self) -> None:
        """The broker's certificate for ``localhost``, by gateway/tls/make-certs.sh."""
        subprocess.run(
            ["sh", str(REPO / "gateway" / "tls" / "make-certs.sh"), str(self.tls_dir), "localhost"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    @property
    def ca_file(self) -> Path:
        """The CA certificate a node is given (``mqtt.ca_file``)."""
        return self.tls_dir / "broker" / "ca.pem"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.dir),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(self.dir / "plugins"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbit.pid"),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # A missing main file, so the machine's /etc/rabbitmq/rabbitmq.conf is not read.
            RABBITMQ_CONFIG_FILE=str(self.dir / "no-main-config"),
            RABBITMQ_CONFIG_FILES=str(self.dir / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(GATEWAY / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(GATEWAY / "enabled_plugins"),
            RABBITMQCTL=f"{RABBIT_BIN}/rabbitmqctl",
        )
        env.pop("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", None)
        return env

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def start(self, timeout: float = 120) -> None:
        """Boot the node and wait until it serves AMQP and MQTT with its topology loaded."""
        if self.running:
            return
        began = time.monotonic()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                self._wrap(["epmd", "-port", str(self.epmd_port), "-address", self.host]),
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        with self._log.open("ab") as log:
            self._server = subprocess.Popen(
                self._wrap([f"{RABBIT_BIN}/rabbitmq-server"]),
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for(
                "RabbitMQ listening on AMQP and MQTT",
                lambda: (
                    self._fail_if_exited()
                    or (
                        port_open(self.amqp_port, self.host)
                        and port_open(self.mqtt_tls_port if self.tls else self.mqtt_port, self.host)
                    )
                ),
                timeout,
                interval=0.25,
            )
            self.ctl("await_startup", "--timeout", str(int(timeout)))
            self.users("apply")
        except Exception:
            self.kill()
            raise
        self.boot_seconds.append(time.monotonic() - began)

    def _wrap(self, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` where this node lives (a cluster node: its own
        network namespace)."""
        return argv

    @property
    def pid(self) -> int:
        """The server's process, which leads the session every node process runs in."""
        if self._server is None:
            raise RuntimeError("the broker is not running")
        return self._server.pid

    def _fail_if_exited(self) -> bool:
        if self._server is not None and self._server.poll() is not None:
            tail = self._log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"rabbitmq-server exited with {self._server.returncode}:\n{tail}")
        return False

    def stop(self, timeout: float = 60) -> None:
        """Orderly shutdown (SIGTERM), as docker compose stop does."""
        if self._server is None:
            return
        if self._server.poll() is None:
            kill_group(self._server, signal.SIGTERM)
            try:
                self._server.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_group(self._server, signal.SIGKILL)
                self._server.wait(10)
        kill_group(self._server, signal.SIGKILL)  # leftovers such as erl_child_setup
        self._server = None
        wait_for("AMQP port released", lambda: not port_open(self.amqp_port, self.host), 30)

    def kill(self) -> None:
        """kill -9 of the whole node: no chance to flush or close anything."""
        if self._server is None:
            return
        kill_group(self._server, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._server.wait(10)
        self._server = None
        wait_for("AMQP port released", lambda: not port_open(self.amqp_port, self.host), 30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop everything and remove the temp dir; safe to call twice."""
        self.kill()
        if self._epmd is not None:
            kill_group(self._epmd)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(5)
            self._epmd = None
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RabbitBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- administration ------------------------------------------------------------------
    def ctl(self, *args: str, input_text: str | None = None) -> str:
        """Run rabbitmqctl against this node; raise with its output on failure."""
        return self._run([f"{RABBIT_BIN}/rabbitmqctl", "-q", *args], input_text)

    def users(self, *args: str, input_text: str | None = None) -> str:
        """Run gateway/rabbitmq/users.sh against this node, as compose and Ansible do."""
        env_extra = {
            "RABBITMQ_ADMIN_USER": self.admin.username,
            "RABBITMQ_ADMIN_PASSWORD": self.admin.password,
            "PIPELINE_AMQP_USER": self.pipeline.username,
            "PIPELINE_AMQP_PASSWORD": self.pipeline.password,
        }
        return self._run(["sh", str(GATEWAY / "users.sh"), *args], input_text, env_extra)

    def _run(
        self, argv: list[str], input_text: str | None, env_extra: dict[str, str] | None = None
    ) -> str:
        env = self.env()
        env.update(env_extra or {})
        done = subprocess.run(
            self._wrap(argv),
            env=env,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stdout}{done.stderr}"
            )
        return done.stdout

    def add_node(self, node_id: str, password: str | None = None) -> NodeCredentials:
        """Register a node's MQTT user that may publish only under its own id."""
        creds = NodeCredentials(node_id, password or secrets.token_urlsafe(12))
        self.users("node", node_id, input_text=creds.password)
        return creds

    # -- AMQP access for assertions ------------------------------------------------------
    def amqp_url(self, creds: NodeCredentials | None = None) -> str:
        creds = creds or self.pipeline
        return (
            f"amqp://{quote(creds.username, safe='')}:{quote(creds.password, safe='')}"
            f"@{self.host}:{self.amqp_port}/%2F"
        )

    def connection(self, creds: NodeCredentials | None = None) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.amqp_url(creds)))

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (quorum queue counts lag about a second)."""
        with contextlib.closing(self.connection()) as conn:
            ok = conn.channel().queue_declare(queue, passive=True)
            return int(ok.method.message_count)

    def wait_depth(self, queue: str, expected: int, timeout: float = 30) -> None:
        wait_for(f"{expected} messages in {queue}", lambda: self.depth(queue) == expected, timeout)

    def drain(self, queue: str, limit: int = 100_000) -> list[tuple[Any, Any, bytes]]:
        """Take (and ack) every ready message of ``queue``: (method, properties, body)."""
        taken: list[tuple[Any, Any, bytes]] = []
        with contextlib.closing(self.connection()) as conn:
            channel = conn.channel()
            while len(taken) < limit:
                method, props, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                taken.append((method, props, body))
        return taken

    def purge(self, *queues: str) -> None:
        with contextlib.closing(self.connection(self.admin)) as conn:
            channel = conn.channel()
            for queue in queues:
                channel.queue_purge(queue)

    def publish(
        self,
        messages: list[tuple[str, bytes]],
        *,
        exchange: str = "amq.topic",
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish (routing key, body) pairs persistently, as the admin, with confirms.

        The admin bypasses topic permissions, so tests can act as any node quickly; MQTT
        ingest itself is covered by the tests that publish through paho.
        """
        props = pika.BasicProperties(delivery_mode=2, headers=headers)
        with contextlib.closing(self.connection(self.admin)) as conn:
            channel = conn.channel()
            channel.confirm_delivery()
            for routing_key, body in messages:
                channel.basic_publish(exchange, routing_key, body, props, mandatory=True)

    def unacked(self, queue: str) -> tuple[int, int]:
        """(ready, unacknowledged) as the broker counts them."""
        for line in self.ctl(
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ).splitlines():
            name, ready, unacked = line.split("\t")
            if name == queue:
                return int(ready), int(unacked)
        raise KeyError(queue)
