"""What one node, or the pipeline's account, can take from the broker: attacks that must fail.

- the pipeline's broker user cannot log into the management API (it has no tag);
- a node user holds at most NODE_MAX_CONNECTIONS (3) connections, and a short password is
  refused when its user is made;
- a message over the broker's limit (rabbitmq.conf's max_message_size, near the contract's
  4 KiB) is refused;
- a full queue refuses publishes instead of dropping what it holds (overflow = reject-publish):
  the agent keeps the refused readings in its outbox and every one of them lands once later;
- a node flooding the broker (extra connections, oversized messages, as fast as it can) does
  not keep the other nodes' readings from landing.

Each runs on the native broker and on RabbitMQ 4 in its image.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pika
import pika.exceptions
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.outbox import Outbox
from tests.conftest import Database
from tests.harness import NodeCredentials, RabbitBroker
from tests.harness.agent_proc import AgentProcess, outbox_state, write_config
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.procs import REPO, wait_for

pytestmark = [pytest.mark.system, pytest.mark.both_brokers]

NODE_MAX_CONNECTIONS = 3  # gateway/rabbitmq/users.sh's default
DEFINITIONS = json.loads((REPO / "gateway/rabbitmq/definitions.json").read_text(encoding="utf-8"))


def _reading(node: str, seq: int, pad: int = 0) -> bytes:
    doc: dict[str, Any] = {
        "version": 1,
        "node": node,
        "sensor": "t1",
        "kind": "simulated",
        "seq": seq,
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "temperature_c": 21.5,
    }
    body = json.dumps(doc).encode()
    return body + b" " * pad


class Client:
    """A paho-mqtt 2.x session that records whether it is connected and what was PUBACKed."""

    def __init__(self, broker: RabbitBroker, creds: NodeCredentials, client_id: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(creds.username, creds.password)
        self.client.max_inflight_messages_set(100)
        self.connack: Any = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.acked = 0
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", broker.mqtt_port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack = rc
        if not rc.is_failure:
            self.connected.set()
        else:
            self.disconnected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self.disconnected.set()

    def _on_publish(self, _c: Any, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
        self.acked += 1

    def up(self, timeout: float = 10) -> bool:
        """True when the broker accepted the connection and has not closed it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.disconnected.is_set():
                return False
            if self.connected.is_set():
                time.sleep(0.5)  # a refused connection may be closed right after CONNACK
                return not self.disconnected.is_set()
            time.sleep(0.05)
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _api_status(broker: RabbitBroker, user: str, password: str, path: str = "whoami") -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{broker.management_port}/api/{path}",
        headers={
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_pipeline_user_cannot_use_the_management_api(rabbit: RabbitBroker) -> None:
    """It consumes over AMQP; with a `monitoring` tag it could list every connection, user and
    client address in the UI."""
    assert _api_status(rabbit, rabbit.pipeline.username, rabbit.pipeline.password) == 401
    assert _api_status(rabbit, rabbit.pipeline.username, rabbit.pipeline.password, "connections")
    assert rabbit.ctl("list_users", "--no-table-headers").count("\n") >= 2
    tags = dict(
        line.split("\t", 1) for line in rabbit.ctl("list_users", "--no-table-headers").splitlines()
    )
    assert tags[rabbit.pipeline.username].strip() in ("[]", "")


def test_a_node_holds_at_most_its_connection_limit(
    rabbit: RabbitBroker, clients: list[Client]
) -> None:
    creds = rabbit.add_node("pi-greedy")
    for n in range(NODE_MAX_CONNECTIONS + 3):
        clients.append(Client(rabbit, creds, f"pi-greedy-{n}"))
        time.sleep(0.2)
    accepted = [client.up() for client in clients]
    assert accepted.count(True) == NODE_MAX_CONNECTIONS, accepted
    limits = rabbit.ctl("list_user_limits", "--user", creds.username)
    assert f'"max-connections":{NODE_MAX_CONNECTIONS}' in limits.replace(" ", "")


def test_a_short_node_password_is_refused(rabbit: RabbitBroker) -> None:
    with pytest.raises(RuntimeError, match="at least 12"):
        rabbit.add_node("pi-weak", "short-pw")
    assert "pi-weak" not in rabbit.ctl("list_users", "--no-table-headers")


def test_a_message_over_the_broker_limit_is_refused(
    rabbit: RabbitBroker, clients: list[Client]
) -> None:
    creds = rabbit.add_node("pi-big")
    client = Client(rabbit, creds, "pi-big")
    clients.append(client)
    assert client.up()
    limit = 8192  # gateway/rabbitmq/rabbitmq.conf: max_message_size
    client.client.publish("sensors/pi-big/t1", _reading("pi-big", 1, pad=limit), qos=1)
    assert client.disconnected.wait(10) or client.acked == 0
    time.sleep(1.5)  # quorum queue counts lag about a second
    assert rabbit.depth("readings") == 0
    assert rabbit.depth("readings.dead") == 0


@pytest.mark.slow
def test_a_full_queue_refuses_publishes_and_the_agent_keeps_them(
    rabbit: RabbitBroker, database: Database, tmp_path: Path
) -> None:
    """The readings queue's policy, with its byte limit made small for the test (a policy of a
    higher priority, same overflow): when the queue is full the broker refuses the agent's
    publishes, the agent keeps those readings in its outbox, and once the pipeline drains the
    queue every sequence number the agent handed out lands exactly once.

    RabbitMQ 3.10 closes the publisher's connection on a refused publish; 4.x only withholds
    the PUBACK and keeps the connection open, so there the agent gets going again through its
    PUBACK timeout (``mqtt.puback_timeout_s``, made 3 s here), which ends the session and sends
    everything unacknowledged again from the outbox."""
    policy = _policy("readings-dead-lettering")
    assert policy["overflow"] == "reject-publish"
    _override_policy(
        rabbit, "test-small-readings", "^readings$", {**policy, "max-length-bytes": 16 * 1024}
    )
    agent: AgentProcess | None = None
    try:
        creds = rabbit.add_node("pi-full")
        config = write_config(tmp_path, rabbit, creds, interval_s=0.01, sensors=2)
        # write_config's `extra` lands after the [[sensors]] tables, and TOML cannot reopen
        # [mqtt] there: put the key into the [mqtt] table itself.
        config.write_text(
            config.read_text().replace("[mqtt]\n", "[mqtt]\npuback_timeout_s = 3\n", 1)
        )
        outbox = tmp_path / "outbox.sqlite"
        Outbox(outbox).close()
        first = outbox_state(outbox)[1] + 1
        agent = AgentProcess(config)
        # About 120 readings (130-140 bytes each) fill 16 KiB; then the queue refuses and the
        # outbox grows.
        wait_for(
            "the outbox growing behind a full queue", lambda: outbox_state(outbox)[0] > 300, 60
        )
        assert 0 < rabbit.depth("readings") <= 16 * 1024 // 100  # every reading is > 100 bytes
        assert agent.alive(), f"the agent died on refused publishes:\n{agent.log[-2000:]}"
        rabbit.ctl("clear_policy", "test-small-readings")
        with ConsumerProcess(rabbit, database.writer_url):
            try:
                wait_for(
                    "the outbox drained", lambda: outbox_state(outbox)[0] < 20, 120, interval=0.5
                )
            finally:
                print(f"--- agent log ---\n{agent.log[-4000:]}")
            assert agent.terminate() == 0
            agent = None
            top = outbox_state(outbox)[1]
            assert outbox_state(outbox)[0] == 0

            def stored() -> int:
                with psycopg.connect(database.owner_url) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM readings WHERE node = 'pi-full'"
                    ).fetchone()
                return int(row[0]) if row else 0

            wait_for(f"{top - first + 1} readings stored", lambda: stored() >= top - first + 1, 60)
        with psycopg.connect(database.owner_url) as conn:
            seqs = [r[0] for r in conn.execute("SELECT seq FROM readings ORDER BY seq")]
        assert seqs == list(range(first, top + 1))
        assert rabbit.depth("readings.dead") == 0
    finally:
        if agent is not None:
            agent.kill()
        with contextlib.suppress(RuntimeError):
            rabbit.ctl("clear_policy", "test-small-readings")


@pytest.mark.slow
def test_a_flooding_node_does_not_stop_the_others(
    rabbit: RabbitBroker, database: Database, tmp_path: Path, clients: list[Client]
) -> None:
    """One node opens more connections than it may, sends oversized messages and then publishes
    as fast as it can on every connection it got; two other nodes' agents keep sampling. The
    others' readings keep landing while the flood goes on, and none is lost."""
    flood = rabbit.add_node("pi-flood")
    agents: list[AgentProcess] = []
    outboxes: dict[str, tuple[Path, int]] = {}
    stop = threading.Event()
    sent = [0]
    try:
        with ConsumerProcess(rabbit, database.writer_url):
            for name in ("pi-calm-a", "pi-calm-b"):
                creds = rabbit.add_node(name)
                directory = tmp_path / name
                config = write_config(directory, rabbit, creds, interval_s=0.05, sensors=2)
                Outbox(directory / "outbox.sqlite").close()
                outboxes[name] = (
                    directory / "outbox.sqlite",
                    outbox_state(directory / "outbox.sqlite")[1] + 1,
                )
                agents.append(AgentProcess(config))
            # One after the other: RabbitMQ 4 counts a connection against the limit only once
            # it is registered, so simultaneous attempts can slip past it (see the README).
            for n in range(NODE_MAX_CONNECTIONS + 5):
                clients.append(Client(rabbit, flood, f"pi-flood-{n}"))
                time.sleep(0.2)
            live = [c for c in clients if c.up()]
            assert len(live) == NODE_MAX_CONNECTIONS, len(live)
            # Oversized messages cost the flooder its connection, not the others anything.
            live[0].client.publish("sensors/pi-flood/t1", _reading("pi-flood", 0, pad=9000), qos=1)

            def hammer(client: Client, base: int) -> None:
                # Each connection its own sequence numbers: this flood is about volume (a key
                # reused with other content is a dead letter of its own, test_store_conflicts).
                seq = base
                while not stop.is_set():
                    seq += 1
                    client.client.publish(
                        "sensors/pi-flood/t1", _reading("pi-flood", seq, pad=3000), qos=0
                    )
                    sent[0] += 1
                    if seq % 500 == 0:
                        time.sleep(0.001)

            threads = [
                threading.Thread(target=hammer, args=(c, i * 10**9), daemon=True)
                for i, c in enumerate(live[1:])
            ]
            for thread in threads:
                thread.start()

            def calm_rows() -> int:
                with psycopg.connect(database.owner_url) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM readings WHERE node LIKE 'pi-calm-%'"
                    ).fetchone()
                return int(row[0]) if row else 0

            began = calm_rows()
            time.sleep(10)
            during = calm_rows() - began
            stop.set()
            for thread in threads:
                thread.join(10)
            print(f"flood: {sent[0]} messages sent; the calm nodes stored {during} in 10 s")
            # Two nodes, two sensors each every 50 ms: about 800 readings in 10 s.
            assert during > 200, f"only {during} readings of the calm nodes landed during the flood"
            for agent in agents:
                assert agent.terminate() == 0
            tops = {name: outbox_state(path)[1] for name, (path, _first) in outboxes.items()}

            def all_calm_stored() -> bool:
                with psycopg.connect(database.owner_url) as conn:
                    return all(
                        conn.execute(
                            "SELECT count(*) FROM readings WHERE node = %s", (name,)
                        ).fetchone()
                        == (tops[name] - first + 1,)
                        for name, (_path, first) in outboxes.items()
                    )

            wait_for("every calm reading stored", all_calm_stored, 120, interval=0.5)
    finally:
        stop.set()
        for agent in agents:
            if agent.alive():
                agent.kill()


@pytest.mark.slow
def test_an_unusable_message_reaches_a_full_dead_letter_queue_by_the_brokers_way(
    rabbit: RabbitBroker, database: Database
) -> None:
    """When ``readings.dead`` is full (its length limit reached, reject-publish), the broker
    refuses the consumer's copy of an unusable message, and the consumer rejects the original
    instead (pipeline.deadletters). The readings queue's dead-letter policy then moves the
    original into ``readings.dead`` itself, full or not: it is kept, with the broker's
    ``x-death`` record, and the reason is in the consumer's log."""
    full = {**_policy("readings-dead-limits"), "max-length": 1}
    _override_policy(rabbit, "test-full-readings-dead", r"^readings\.dead$", full)
    unusable = b'{"version": 1, "node": "pi-dead-full", "not": "a reading"}'
    try:
        fillers = _fill(rabbit, "readings.dead")
        with ConsumerProcess(rabbit, database.writer_url) as consumer:
            rabbit.publish([("sensors.pi-dead-full.t1", unusable)])
            wait_for(
                "the copy refused and the original rejected",
                lambda: "dead-letter copy refused, rejecting instead" in consumer.log,
                30,
            )
            assert "unknown field 'not'" in consumer.log  # the reason, logged
            wanted = len(fillers) + 1
            wait_for(
                "the original in readings.dead",
                lambda: rabbit.depth("readings.dead") >= wanted,
                30,
            )
            time.sleep(1.5)  # quorum queue counts lag: nothing more arrives
            got = _messages(rabbit, "readings.dead", wanted + 1)
            assert sorted(body for _props, body in got) == sorted([*fillers, unusable])
            props = next(props for props, body in got if body == unusable)
            deaths = (props.headers or {}).get("x-death")
            assert deaths, props
            assert deaths[0]["reason"] == "rejected", deaths
            assert deaths[0]["queue"] == "readings", deaths
            assert rabbit.depth("readings") == 0
    finally:
        with contextlib.suppress(RuntimeError):
            rabbit.ctl("clear_policy", "test-full-readings-dead")


def _policy(name: str) -> dict[str, Any]:
    """The definition of one of the gateway's policies (gateway/rabbitmq/definitions.json)."""
    return dict(next(p for p in DEFINITIONS["policies"] if p["name"] == name)["definition"])


def _override_policy(
    rabbit: RabbitBroker, name: str, pattern: str, definition: dict[str, Any]
) -> None:
    """A test's policy on ``pattern`` that wins over the gateway's (a higher priority)."""
    rabbit.ctl(
        "set_policy",
        "--priority",
        "99",
        "--apply-to",
        "queues",
        name,
        pattern,
        json.dumps(definition),
    )


def _fill(rabbit: RabbitBroker, queue: str) -> list[bytes]:
    """Publish into ``queue`` until it refuses a publish (a quorum queue's reject-publish lets
    the publish that reaches its limit in); the bodies it took."""
    taken: list[bytes] = []
    with contextlib.closing(rabbit.connection(rabbit.admin)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for n in range(10):
            body = f"filler {n}".encode()
            try:
                channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
            except pika.exceptions.NackError:
                return taken
            taken.append(body)
    raise AssertionError(f"{queue} took {len(taken)} messages and refused none")


def _messages(rabbit: RabbitBroker, queue: str, limit: int) -> list[tuple[Any, bytes]]:
    """Up to ``limit`` messages of ``queue`` as (properties, body), left in place."""
    with contextlib.closing(rabbit.connection(rabbit.admin)) as conn:
        channel = conn.channel()
        got = [channel.basic_get(queue, auto_ack=False) for _ in range(limit)]
        return [(props, body) for method, props, body in got if method is not None]
