"""gateway/rabbitmq/ holds keys that every RabbitMQ line we support accepts."""

from __future__ import annotations

import json
import re
import subprocess

from tests.harness.procs import REPO

GATEWAY = REPO / "gateway" / "rabbitmq"


def _conf() -> dict[str, str]:
    pairs: dict[str, str] = {}
    for raw in (GATEWAY / "rabbitmq.conf").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_plugins() -> None:
    text = (GATEWAY / "enabled_plugins").read_text().strip()
    assert text == "[rabbitmq_management,rabbitmq_mqtt,rabbitmq_prometheus]."


def test_conf_refuses_anonymous_and_avoids_keys_removed_in_4x() -> None:
    conf = _conf()
    assert conf["mqtt.allow_anonymous"] == "false"
    assert conf["mqtt.listeners.tcp.default"] == "1883"
    assert "mqtt.default_user" not in conf  # RabbitMQ 4.x refuses to boot on it
    assert "mqtt.default_pass" not in conf
    assert conf["definitions.import_backend"] == "local_filesystem"
    assert conf["definitions.local.path"] == "/etc/rabbitmq/definitions.json"


def test_definitions_hold_topology_and_no_secrets() -> None:
    defs = json.loads((GATEWAY / "definitions.json").read_text())
    assert defs["users"] == []
    assert defs["permissions"] == []
    assert [v["name"] for v in defs["vhosts"]] == ["/"]
    queues = {q["name"]: q for q in defs["queues"]}
    assert queues["readings"]["durable"]
    assert queues["readings"]["arguments"]["x-queue-type"] == "quorum"
    policies = {p["name"]: p for p in defs["policies"]}
    for queue in ("readings", "node-status"):
        policy = policies[f"{queue}-dead-lettering"]
        assert re.fullmatch(policy["pattern"], queue)
        assert not re.fullmatch(policy["pattern"], f"{queue}.dead")
        assert policy["definition"]["dead-letter-exchange"] == ""
        assert policy["definition"]["dead-letter-routing-key"] == f"{queue}.dead"


def test_users_script_rejects_bad_node_ids() -> None:
    for bad in ("a.b", "a/b", "", "x'y", "a b"):
        done = subprocess.run(
            ["sh", str(GATEWAY / "users.sh"), "node", bad],
            input="pw",
            capture_output=True,
            text=True,
            check=False,
            env={"RABBITMQCTL": "/bin/false", "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 2, bad
        assert "invalid" in done.stderr
