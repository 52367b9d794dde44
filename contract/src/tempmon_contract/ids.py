"""Ids, topics and routing keys: the names both wings put on a reading.

A node id is also the node's broker user name; a sensor id is the last level of its topic. A
``.`` or ``/`` in either would change the topic's levels (and the AMQP routing key's words), so
only ``[A-Za-z0-9_-]`` is allowed. ``gateway/schema/*.json`` publishes the same pattern, the
SQL CHECK constraints (pipeline migrations), the Ansible roles' validation and
``gateway/rabbitmq/users.sh`` test it too; ``tests/unit/test_contract.py`` holds them to this.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "ID",
    "ID_CHARS",
    "ID_MAX",
    "ID_PATTERN",
    "ID_RULE",
    "READINGS_PREFIX",
    "SESSION",
    "SESSION_RULE",
    "STATUS_PREFIX",
    "is_id",
    "node_of_status_routing_key",
    "reading_routing_key",
    "reading_topic",
    "sensor_of_routing_key",
    "status_routing_key",
    "status_topic",
]

ID_MAX: Final = 64
ID_CHARS: Final = "[A-Za-z0-9_-]"
"""The characters of an id, as a regex class (all ASCII: an id's length in bytes and in
characters is the same)."""
ID_PATTERN: Final = rf"{ID_CHARS}{{1,{ID_MAX}}}"
"""A node or sensor id (without anchors; ``re.fullmatch`` it, or anchor it for a schema). The
SQL CHECKs say it as ``~ '^ID_CHARS+$' AND octet_length(...) <= ID_MAX``: PostgreSQL's regex
engine runs a bounded repeat ten times slower (pipeline migration 0008)."""

ID: Final = re.compile(ID_PATTERN)
ID_RULE: Final = f"1 to {ID_MAX} letters, digits, '_' or '-'"
"""How an error message says what an id must be."""

SESSION: Final = re.compile(r"[0-9a-f]{16}")
"""One MQTT connection of an agent: 64 random bits as lowercase hex (status.v1 ``session``)."""
SESSION_RULE: Final = "16 lowercase hex digits"

READINGS_PREFIX: Final = "sensors"
STATUS_PREFIX: Final = "status"


def is_id(value: object) -> bool:
    """True for a string that is a valid node or sensor id."""
    return type(value) is str and ID.fullmatch(value) is not None


def reading_topic(node: str, sensor: str) -> str:
    """The MQTT topic of a sensor's readings: ``sensors/<node>/<sensor>``."""
    return f"{READINGS_PREFIX}/{node}/{sensor}"


def status_topic(node: str) -> str:
    """The MQTT topic of a node's status (and its Last Will): ``status/<node>``."""
    return f"{STATUS_PREFIX}/{node}"


def reading_routing_key(node: str, sensor: str) -> str:
    """The AMQP routing key RabbitMQ's MQTT plugin gives :func:`reading_topic`."""
    return f"{READINGS_PREFIX}.{node}.{sensor}"


def status_routing_key(node: str) -> str:
    """The AMQP routing key of :func:`status_topic`."""
    return f"{STATUS_PREFIX}.{node}"


def sensor_of_routing_key(routing_key: str) -> tuple[str, str] | None:
    """``(node, sensor)`` of ``sensors.<node>.<sensor>`` with valid ids, else None."""
    parts = routing_key.split(".")
    if (
        len(parts) != 3
        or parts[0] != READINGS_PREFIX
        or ID.fullmatch(parts[1]) is None
        or ID.fullmatch(parts[2]) is None
    ):
        return None
    return parts[1], parts[2]


def node_of_status_routing_key(routing_key: str) -> str | None:
    """``<node>`` of ``status.<node>`` with a valid id, else None."""
    parts = routing_key.split(".")
    if len(parts) != 2 or parts[0] != STATUS_PREFIX or ID.fullmatch(parts[1]) is None:
        return None
    return parts[1]
