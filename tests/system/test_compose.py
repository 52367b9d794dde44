"""`docker compose up` as a new user runs it: our compose file, unmodified, on a real Docker Engine.

The README's quick start, step by step, on the private engine of the tests (``docker_engine``)
with the stand-in images (``standins``: Debian 13's RabbitMQ 4.0, PostgreSQL 17 and Python 3.13
tagged rabbitmq:4-management, postgres:17 and python:3.12-slim, since no registry is
reachable): ``.env.example`` copied to a ``.env`` whose every ``change-me`` is a random password
(and whose host ports are moved to free ones: this machine may run its own RabbitMQ, PostgreSQL
and Mosquitto), then ``docker compose build`` and ``up -d`` from the repository's root. Then:

- every service becomes healthy and none restarts; the one-shot ``migrate`` exits 0;
- the management API answers the admin; PostgreSQL is published on 127.0.0.1 only;
- a node user made with the README's ``users.sh node`` command publishes over MQTT from the
  host, ``docker compose kill pipeline`` hits mid-stream, ``up -d`` again: every reading once;
- ``--profile demo``: the simulated agents' readings land, ``pipeline summary`` (through
  ``docker compose exec``) and ``nodes`` show them;
- a reading the pipeline cannot use is in ``readings.dead``; ``pipeline dead list`` shows why;
- ``down`` then ``up`` with readings queued and the consumers stopped: the queued readings, the
  rows and the dead letters are kept, nothing twice;
- ``--scale pipeline=3``: three consumers on the queue, each new reading once;
- at the end every demo agent's sequence numbers are in ``readings`` once, without a gap.

Each phase's time is printed (``-s`` shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness.compose_env import compose_env_file, move_ports
from tests.harness.docker import DockerEngine, StandIns
from tests.harness.procs import REPO, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.docker]

NODE = "pi-compose"
SENSOR = "28-00000c0de5e5"
DEMO_NODES = ("demo-1", "demo-2", "demo-3")
LONG_RUNNING = ("rabbitmq", "postgres", "pipeline")


@dataclass
class Gateway:
    """The compose project of the repository, driven through the docker compose CLI."""

    engine: DockerEngine
    env_file: Path
    settings: dict[str, str]
    phases: dict[str, float] = field(default_factory=dict)
    # -f files after docker-compose.yml (gateway/compose.tls.yml once TLS is on).
    overrides: list[str] = field(default_factory=list)

    def run(
        self, *args: str, timeout: float = 600, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        files = [a for f in ("docker-compose.yml", *self.overrides) for a in ("-f", f)]
        return subprocess.run(
            ["docker", "compose", "--env-file", str(self.env_file), *files, *args],
            cwd=REPO,
            env=self.engine.env(),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def compose(self, *args: str, timeout: float = 600, input_text: str | None = None) -> str:
        done = self.run(*args, timeout=timeout, input_text=input_text)
        assert done.returncode == 0, (
            f"docker compose {' '.join(args)} failed ({done.returncode}):\n"
            f"{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
        return done.stdout

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.phases[name] = time.monotonic() - began
        print(f"compose phase {name}: {self.phases[name]:.1f} s")

    # -- containers ------------------------------------------------------------------------------
    def containers(self) -> list[dict[str, Any]]:
        ids = self.compose("--profile", "demo", "ps", "--all", "--quiet").split()
        if not ids:
            return []
        out = self.engine.docker("inspect", *ids).stdout
        return list(json.loads(out))

    @staticmethod
    def service(container: dict[str, Any]) -> str:
        return str(container["Config"]["Labels"]["com.docker.compose.service"])

    def wait_healthy(self, expect: dict[str, int], timeout: float = 300) -> list[dict[str, Any]]:
        """Wait until each long-running service has ``expect[service]`` healthy containers (or
        running ones, for services without a healthcheck) and ``migrate`` exited 0."""
        seen: list[dict[str, Any]] = []

        def healthy() -> bool:
            nonlocal seen
            seen = self.containers()
            counts = dict.fromkeys(expect, 0)
            for c in seen:
                name, state = self.service(c), c["State"]
                if name == "migrate":
                    assert state["Status"] != "exited" or state["ExitCode"] == 0, (
                        f"migrate failed:\n{self.compose('logs', 'migrate')[-3000:]}"
                    )
                    continue
                ok = state["Running"] and state.get("Health", {}).get("Status", "healthy") in {
                    "healthy"
                }
                if name in counts and ok:
                    counts[name] += 1
            return counts == expect

        try:
            wait_for(f"healthy services {expect}", healthy, timeout, interval=1)
        except TimeoutError:
            states = {c["Name"]: (c["State"]["Status"], c["State"].get("Health")) for c in seen}
            logs = self.compose("--profile", "demo", "logs", "--tail", "40")
            raise AssertionError(f"not healthy: {states}\n{logs[-6000:]}") from None
        return seen

    def exec(self, service: str, *argv: str, input_text: str | None = None) -> str:
        return self.compose("exec", "-T", service, *argv, input_text=input_text, timeout=180)

    # -- the host's view: management API, PostgreSQL, MQTT ----------------------------------------
    def api(self, path: str, user: str | None = None, password: str | None = None) -> Any:
        user = user or self.settings["RABBITMQ_ADMIN_USER"]
        password = password or self.settings["RABBITMQ_ADMIN_PASSWORD"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.settings['RABBITMQ_UI_PORT']}/api/{path}",
            headers={"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def queue(self, name: str) -> dict[str, Any]:
        return dict(self.api(f"queues/%2F/{name}"))

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        """A query as the read-only role, from the host through the published port."""
        with psycopg.connect(
            host="127.0.0.1",
            port=int(self.settings["POSTGRES_PORT"]),
            dbname=self.settings["POSTGRES_DB"],
            user=self.settings["READER_DB_USER"],
            password=self.settings["READER_DB_PASSWORD"],
            connect_timeout=10,
        ) as conn:
            return conn.execute(query, params).fetchall()

    def node_rows(self, node: str) -> tuple[int, int]:
        """(rows, distinct sequence numbers) of one node."""
        row = self.sql("SELECT count(*), count(DISTINCT seq) FROM readings WHERE node = %s", node)
        return int(row[0][0]), int(row[0][1])


class Publisher:
    """One node publishing readings over MQTT (QoS 1) from the host, in a thread."""

    def __init__(self, port: int, node: str, password: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{node}-test", protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(node, password)
        self.client.max_inflight_messages_set(100)
        self.connected = threading.Event()
        self.acked = 0
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(20), "the node could not connect over MQTT"
        self.node = node

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc == 0:
            self.connected.set()

    def _on_publish(self, _c: Any, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            self.acked += 1

    def publish(self, seqs: range, rate_per_s: float, *, temperature: float = 21.5) -> None:
        """Publish one reading per sequence number at about ``rate_per_s``; wait for PUBACKs."""
        began = time.monotonic()
        before = self.acked
        for i, seq in enumerate(seqs):
            body = json.dumps(
                {
                    "version": 1,
                    "node": self.node,
                    "sensor": SENSOR,
                    "kind": "ds18b20",
                    "seq": seq,
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "temperature_c": temperature,
                }
            )
            self.client.publish(f"sensors/{self.node}/{SENSOR}", body, qos=1)
            ahead = began + (i + 1) / rate_per_s - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        wait_for(
            f"{len(seqs)} PUBACKs", lambda: self.acked - before >= len(seqs), 60, interval=0.05
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.timeout(2400)
def test_compose_quick_start_runs_and_keeps_every_reading_once(
    docker_engine: DockerEngine, standins: StandIns, tmp_path: Path
) -> None:
    env_file, settings = compose_env_file(tmp_path)
    gw = Gateway(docker_engine, env_file, settings)
    print(f"docker compose {docker_engine.compose_version()}, images {standins.tags}")
    try:
        _run_quick_start(gw)
    finally:
        with contextlib.suppress(Exception):
            gw.compose("--profile", "demo", "down", "--volumes", "--timeout", "60")
    print("compose phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in gw.phases.items()))


def _run_quick_start(gw: Gateway) -> None:
    with gw.phase("build"):
        gw.compose("--profile", "demo", "build")
    with gw.phase("up"):
        gw.compose("up", "-d")
        containers = gw.wait_healthy({"rabbitmq": 1, "postgres": 1, "pipeline": 2})

    with gw.phase("checks"):
        # No service restarted on its way up.
        restarts = {c["Name"]: c["RestartCount"] for c in containers}
        assert all(count == 0 for count in restarts.values()), restarts
        # The management API answers the admin, and nobody else.
        whoami = gw.api("whoami")
        assert whoami["name"] == gw.settings["RABBITMQ_ADMIN_USER"]
        assert "administrator" in str(whoami["tags"])
        with pytest.raises(urllib.error.HTTPError) as refused:
            gw.api("whoami", password="wrong-" + secrets.token_hex(4))
        assert refused.value.code == 401
        # PostgreSQL, AMQP and the management UI are published on the loopback interface
        # only; MQTT, for the Pis, on every interface.
        postgres = next(c for c in containers if gw.service(c) == "postgres")
        bindings = postgres["HostConfig"]["PortBindings"]["5432/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"], bindings
        rabbitmq = next(c for c in containers if gw.service(c) == "rabbitmq")
        published = rabbitmq["HostConfig"]["PortBindings"]
        assert [b["HostIp"] for b in published["5672/tcp"]] == ["127.0.0.1"], published
        assert [b["HostIp"] for b in published["15672/tcp"]] == ["127.0.0.1"], published
        every_interface = ([""], ["0.0.0.0"])  # noqa: S104 - the Pis must reach MQTT
        assert [b["HostIp"] for b in published["1883/tcp"]] in every_interface, published
        assert set(published) == {"1883/tcp", "5672/tcp", "15672/tcp"}, published
        # The schema belongs to its owner role, which is not a superuser; migrate ran as it.
        owners = gw.sql(
            "SELECT DISTINCT pg_get_userbyid(c.relowner), r.rolsuper FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_roles r ON r.oid = c.relowner WHERE n.nspname = 'public'"
        )
        assert owners == [(gw.settings["MIGRATE_DB_USER"], False)], owners
        published = gw.compose("port", "postgres", "5432").strip()
        assert published == f"127.0.0.1:{gw.settings['POSTGRES_PORT']}", published
        assert gw.sql("SELECT current_user")[0][0] == gw.settings["READER_DB_USER"]
        # The queues a new user watches in the UI exist, with two consumers on readings.
        assert gw.queue("readings")["consumers"] == 2
        assert gw.queue("readings.dead")["messages"] == 0

    # A Pi's broker user, with the README's command; then readings from the host over MQTT
    # while every consumer is killed mid-stream.
    password = "node-" + secrets.token_urlsafe(16)
    with gw.phase("node user"):
        out = gw.exec(
            "rabbitmq", "sh", "/etc/rabbitmq/gateway/users.sh", "node", NODE, input_text=password
        )
        assert f"node user {NODE}" in out
    publisher = Publisher(int(gw.settings["MQTT_PORT"]), NODE, password)
    try:
        with gw.phase("kill pipeline mid-stream"):
            first = 4000
            flow = threading.Thread(
                target=publisher.publish, args=(range(1, first + 1), 800.0), daemon=True
            )
            flow.start()
            wait_for("rows flowing", lambda: gw.node_rows(NODE)[0] > 300, 60, interval=0.1)
            gw.compose("kill", "pipeline")
            stored_at_kill = gw.node_rows(NODE)[0]
            flow.join(120)
            assert not flow.is_alive()
            gw.compose("up", "-d")
            gw.wait_healthy({"rabbitmq": 1, "postgres": 1, "pipeline": 2})
            wait_for(
                f"{first} readings of {NODE}",
                lambda: gw.node_rows(NODE)[0] >= first,
                120,
                interval=0.5,
            )
            assert stored_at_kill < first, "the kill came after the stream: not mid-stream"
            assert gw.node_rows(NODE) == (first, first)
            print(f"killed both consumers at {stored_at_kill} of {first} rows; all {first} once")

        with gw.phase("demo profile"):
            gw.compose("--profile", "demo", "up", "-d")
            wait_for(
                "readings of every demo node in the last-hour summary",
                lambda: (
                    {
                        row["node"]
                        for row in json.loads(gw.exec("pipeline", "pipeline", "summary", "--json"))
                    }
                    >= set(DEMO_NODES)
                ),
                120,
                interval=2,
            )
            summary = json.loads(gw.exec("pipeline", "pipeline", "summary", "--json"))
            demo_rows = [row for row in summary if row["node"] in DEMO_NODES]
            assert all(row["readings"] > 0 for row in demo_rows), demo_rows
            table = gw.exec("pipeline", "pipeline", "summary")
            assert "demo-1" in table, table
            nodes = dict(gw.sql("SELECT node, state FROM nodes"))
            assert all(nodes.get(node) == "online" for node in DEMO_NODES), nodes

        with gw.phase("dead letter"):
            publisher.publish(range(first + 1, first + 2), 100.0, temperature=999.0)
            wait_for(
                "the bad reading in readings.dead",
                lambda: gw.queue("readings.dead")["messages"] == 1,
                60,
                interval=0.5,
            )
            dead = json.loads(gw.exec("pipeline", "pipeline", "dead", "list", "--json"))
            assert len(dead) == 1, dead
            assert "temperature_c" in dead[0]["reason"], dead
            assert dead[0]["routing_key"] == f"sensors.{NODE}.{SENSOR}", dead

        with gw.phase("down and up"):
            # Consumers stopped, readings queued: `down` must not lose them (the broker's data
            # lives under its fixed hostname in the volume), nor the rows, nor the dead letter.
            gw.compose("stop", "pipeline")
            queued = range(first + 2, first + 2 + 1500)
            publisher.publish(queued, 3000.0)
            wait_for(
                "the queued readings counted by the broker",
                lambda: gw.queue("readings")["messages"] >= len(queued),
                30,
                interval=0.5,
            )
            rows_before = gw.sql("SELECT count(*) FROM readings")[0][0]
            publisher.close()
            gw.compose("--profile", "demo", "down", "--timeout", "60")
            gw.compose("--profile", "demo", "up", "-d")
            gw.wait_healthy({"rabbitmq": 1, "postgres": 1, "pipeline": 2})
            assert gw.sql("SELECT count(*) FROM readings")[0][0] >= rows_before
            expected = first + len(queued)
            wait_for(
                f"{expected} readings of {NODE} after down and up",
                lambda: gw.node_rows(NODE)[0] >= expected,
                120,
                interval=0.5,
            )
            assert gw.node_rows(NODE) == (expected, expected)
            seqs = gw.sql(
                "SELECT min(seq), max(seq) FROM readings WHERE node = %s AND seq > %s",
                NODE,
                first + 1,
            )
            assert seqs == [(queued[0], queued[-1])]
            dead = json.loads(gw.exec("pipeline", "pipeline", "dead", "list", "--json"))
            assert len(dead) == 1, dead

        with gw.phase("scale to 3"):
            gw.compose("up", "-d", "--scale", "pipeline=3")
            gw.wait_healthy({"rabbitmq": 1, "postgres": 1, "pipeline": 3})
            wait_for(
                "three consumers on readings",
                lambda: gw.queue("readings")["consumers"] == 3,
                60,
                interval=0.5,
            )
            publisher = Publisher(int(gw.settings["MQTT_PORT"]), NODE, password)
            more = range(expected + 2, expected + 2 + 3000)
            publisher.publish(more, 3000.0)
            total = expected + len(more)
            wait_for(
                f"{total} readings of {NODE} with three consumers",
                lambda: gw.node_rows(NODE)[0] >= total,
                120,
                interval=0.5,
            )
            assert gw.node_rows(NODE) == (total, total)
    finally:
        publisher.close()

    with gw.phase("reconcile demo nodes"):
        # SIGTERM: each agent flushes its outbox and says offline. Every sequence number a
        # demo agent handed out since its start is then in readings once, without a gap,
        # through the kill, the down/up and the scale-up.
        for node in DEMO_NODES:
            gw.compose("stop", "--timeout", "60", f"edge-{node}")
        wait_for(
            "the readings queue drained",
            lambda: gw.queue("readings")["messages"] == 0,
            120,
            interval=0.5,
        )
        for node in DEMO_NODES:
            rows, distinct = gw.node_rows(node)
            low, high = gw.sql("SELECT min(seq), max(seq) FROM readings WHERE node = %s", node)[0]
            assert rows == distinct == high - low + 1, (node, rows, distinct, low, high)
            print(f"{node}: {rows} readings, sequence numbers {low}..{high} each once")
        restarts = {c["Name"]: c["RestartCount"] for c in gw.containers()}
        assert all(count == 0 for count in restarts.values()), restarts

    with gw.phase("tls"):
        _tls_on(gw, password)


def _tls_on(gw: Gateway, password: str) -> None:
    """The README's TLS steps: make-certs.sh, chown 999 the key, up with compose.tls.yml. Then
    plain MQTT is closed (not published, not listening), the node publishes over TLS with the
    CA certificate, AMQP and the UI stay on loopback, and the CA's key is not in the broker."""
    certs = Path(gw.settings["TLS_CERTS_DIR"])
    subprocess.run(
        ["sh", str(REPO / "gateway/tls/make-certs.sh"), str(certs), "localhost"],
        check=True,
        capture_output=True,
    )
    os.chown(certs / "broker" / "server.key", 999, -1)
    gw.overrides = ["gateway/compose.tls.yml"]
    gw.compose("up", "-d")
    containers = gw.wait_healthy({"rabbitmq": 1, "postgres": 1, "pipeline": 2})
    rabbitmq = next(c for c in containers if gw.service(c) == "rabbitmq")
    published = rabbitmq["HostConfig"]["PortBindings"]
    assert set(published) == {"8883/tcp", "5672/tcp", "15672/tcp"}, published
    assert [b["HostIp"] for b in published["5672/tcp"]] == ["127.0.0.1"], published
    assert [b["HostIp"] for b in published["15672/tcp"]] == ["127.0.0.1"], published
    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", int(gw.settings["MQTT_PORT"]))) != 0
    tables = gw.exec("rabbitmq", "sh", "-c", "cat /proc/net/tcp /proc/net/tcp6")
    listening = {
        fields[1].rsplit(":", 1)[1]
        for fields in (line.split() for line in tables.splitlines())
        if len(fields) > 3 and fields[3] == "0A"
    }
    assert "075B" not in listening, "plain MQTT (1883) listens in the broker"
    assert "22B3" in listening, "MQTT over TLS (8883) does not listen"
    mounted = gw.exec("rabbitmq", "ls", "-A", "/etc/rabbitmq/tls").split()
    assert sorted(mounted) == ["ca.pem", "server.key", "server.pem"], mounted
    before = gw.node_rows(NODE)[0]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-compose-tls")
    client.username_pw_set(NODE, password)
    client.tls_set(ca_certs=str(certs / "broker" / "ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
    client.connect("localhost", int(gw.settings["MQTT_TLS_PORT"]), keepalive=30)
    client.loop_start()
    try:
        info = client.publish(
            f"sensors/{NODE}/{SENSOR}",
            json.dumps(
                {
                    "version": 1,
                    "node": NODE,
                    "sensor": SENSOR,
                    "kind": "ds18b20",
                    "seq": 10_000_000,
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "temperature_c": 20.0,
                }
            ),
            qos=1,
        )
        info.wait_for_publish(20)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    wait_for("the reading sent over TLS", lambda: gw.node_rows(NODE)[0] == before + 1, 60, 0.5)


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("standins")
def test_compose_refuses_placeholder_and_weak_passwords(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    """`docker compose up` with .env.example as it is (every password change-me), then with one
    short password, then with Grafana's placeholder left: each time the gateway refuses to
    start, says which variable to set, and starts neither the broker nor the database."""
    base = move_ports((REPO / ".env.example").read_text(encoding="utf-8"))
    strong = re.sub(r"change-me", lambda _m: "pw-" + secrets.token_urlsafe(18), base)
    cases = {
        "placeholders": (
            base,
            [
                "RABBITMQ_ADMIN_PASSWORD",
                "POSTGRES_PASSWORD",
                "MIGRATE_DB_PASSWORD",
                "GRAFANA_ADMIN_PASSWORD",
            ],
        ),
        "short": (
            re.sub(r"^READER_DB_PASSWORD=.*$", "READER_DB_PASSWORD=Tr0ub4dor", strong, flags=re.M),
            ["READER_DB_PASSWORD"],
        ),
        "grafana": (
            re.sub(
                r"^GRAFANA_ADMIN_PASSWORD=.*$",
                "GRAFANA_ADMIN_PASSWORD=change-me",
                strong,
                flags=re.M,
            ),
            ["GRAFANA_ADMIN_PASSWORD"],
        ),
    }
    for case, (text, named) in cases.items():
        env_file = tmp_path / f"{case}.env"
        env_file.write_text(text, encoding="utf-8")
        gw = Gateway(docker_engine, env_file, dict(re.findall(r"^([A-Z_]+)=(.*)$", text, re.M)))
        try:
            done = gw.run("up", "-d", timeout=300)
            logs = gw.run("logs", "preflight").stdout
            assert done.returncode != 0, f"{case}: the gateway started:\n{done.stdout}"
            for variable in named:
                assert f"preflight: {variable} " in logs, (case, variable, logs)
            running = {gw.service(c) for c in gw.containers() if c["State"]["Running"]}
            assert not running & {"rabbitmq", "postgres", "pipeline"}, (case, running)
            assert "pw-" not in logs, "a password was printed"
        finally:
            gw.run("down", "--volumes", timeout=120)
