"""The .env a new user writes: .env.example with real passwords and free host ports."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from tests.harness.procs import REPO, free_port

__all__ = ["compose_env_file", "move_ports"]


def move_ports(text: str) -> str:
    """Every host port of .env moved to a free one: this machine may run its own services."""
    for name in (
        "MQTT_PORT",
        "AMQP_PORT",
        "RABBITMQ_UI_PORT",
        "POSTGRES_PORT",
        "GRAFANA_PORT",
        "MQTT_TLS_PORT",
        *(f"{name}_{n}" for name in ("MQTT_PORT", "AMQP_PORT", "RABBITMQ_UI_PORT") for n in (2, 3)),
    ):
        text, count = re.subn(rf"^{name}=.*$", f"{name}={free_port()}", text, flags=re.M)
        assert count == 1, name
    return text


def compose_env_file(directory: Path) -> tuple[Path, dict[str, str]]:
    """.env.example with a random password for every change-me and free host ports."""
    text = (REPO / ".env.example").read_text(encoding="utf-8")
    assert "change-me" in text
    text = re.sub(r"change-me", lambda _m: "pw-" + secrets.token_urlsafe(18), text)
    text = move_ports(text)
    text, count = re.subn(
        r"^TLS_CERTS_DIR=.*$", f"TLS_CERTS_DIR={directory / 'tls'}", text, flags=re.M
    )
    assert count == 1
    text, count = re.subn(
        r"^DEMO_NODE_PASSWORD=.*$",
        f"DEMO_NODE_PASSWORD=demo-{secrets.token_urlsafe(18)}",
        text,
        flags=re.M,
    )
    assert count == 1
    path = directory / ".env"
    path.write_text(text, encoding="utf-8")
    settings = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))
    return path, settings
