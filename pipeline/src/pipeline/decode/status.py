"""Node status messages on ``status/<node>`` (``gateway/schema/status.v1.schema.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from pipeline.decode._common import (
    _check_version,
    _id,
    _integer,
    _load_object,
    _missing,
    _number,
    _same_as_topic,
    _show,
    _unknown_fields,
    _utc_time,
    _wrong_type,
)
from pipeline.errors import Rejected
from tempmon_contract.ids import SESSION, SESSION_RULE, node_of_status_routing_key
from tempmon_contract.wire import MAX_COUNTER, STATES, STATUS_FIELDS, STATUS_REQUIRED

__all__ = ["NodeStatus", "decode_status"]

_FIELDS: Final = frozenset(STATUS_FIELDS)
_MAX_AGENT_VERSION: Final = 64
_MAX_UPTIME_S: Final = 1e12  # about 31,700 years
_MAX_READ_ERRORS: Final = 64


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A node's announcement on ``status/<node>``: its Last Will carries only ``state`` (and
    ``session``, from agents that send one).

    ``session`` names the MQTT connection the status belongs to (None from older agents): an
    ``offline`` applies only to its own connection, and a late ``online`` never undoes its own
    connection's ``offline`` (pipeline.store).
    """

    node: str
    state: str
    ts: datetime | None
    agent_version: str | None
    uptime_s: float | None
    outbox_depth: int | None
    dropped: int | None
    read_errors: dict[str, int] | None
    session: str | None = None


def decode_status(body: bytes, routing_key: str, *, now: datetime) -> NodeStatus:
    """Decode one delivery from the ``node-status`` queue (routing key ``status.<node>``).

    Args:
        body: the message body as delivered.
        routing_key: the AMQP routing key; its node must equal the payload's ``node``.
        now: the receiver's current time, aware; a ``ts`` more than 300 s after it is rejected.

    Raises:
        Rejected: for any payload or routing key that cannot be used; ``reason`` says why.
        TypeError: only if ``now`` is naive.
    """
    obj = _load_object(body)
    _check_version(obj)
    topic_node = node_of_status_routing_key(routing_key)
    if topic_node is None:
        raise Rejected(f"routing key: {_show(routing_key)} is not status.<node>")
    if not obj.keys() <= _FIELDS:
        raise _unknown_fields(obj, _FIELDS, "a status message")
    for field in STATUS_REQUIRED:
        if field not in obj:
            raise _missing(field)
    node = _same_as_topic(obj, "node", topic_node)
    state = obj["state"]
    if type(state) is not str:
        raise _wrong_type("state", state, "'online' or 'offline'")
    if state not in STATES:
        raise Rejected(f"state: {_show(state)} is not 'online' or 'offline'")
    ts = _utc_time(obj["ts"], "ts", now) if "ts" in obj else None
    agent_version = _agent_version(obj["agent_version"]) if "agent_version" in obj else None
    uptime_s: float | None = None
    if "uptime_s" in obj:
        uptime = _number(obj["uptime_s"], "uptime_s")
        # json reads a literal like 1e400 as inf, and an integer like 10**400 exactly: both
        # are beyond any uptime, and the integer would not even convert to a float.
        if not 0 <= uptime < _MAX_UPTIME_S:
            raise Rejected(f"uptime_s: {_show(uptime)} is not a number of seconds >= 0")
        uptime_s = float(uptime)
    outbox_depth = (
        _integer(obj["outbox_depth"], "outbox_depth", MAX_COUNTER)
        if "outbox_depth" in obj
        else None
    )
    dropped = _integer(obj["dropped"], "dropped", MAX_COUNTER) if "dropped" in obj else None
    read_errors = _read_errors(obj["read_errors"]) if "read_errors" in obj else None
    session = _session(obj["session"]) if "session" in obj else None
    return NodeStatus(
        node, state, ts, agent_version, uptime_s, outbox_depth, dropped, read_errors, session
    )


def _session(value: object) -> str:
    if type(value) is not str:
        raise _wrong_type("session", value, SESSION_RULE)
    if SESSION.fullmatch(value) is None:
        raise Rejected(f"session: {_show(value)} is not {SESSION_RULE} (the connection's id)")
    return value


def _agent_version(value: object) -> str:
    if type(value) is not str:
        raise _wrong_type("agent_version", value, "a string")
    if len(value) > _MAX_AGENT_VERSION:
        raise Rejected(
            f"agent_version: {_show(value)} is longer than {_MAX_AGENT_VERSION} characters"
        )
    # Control characters (NUL above all: PostgreSQL text cannot hold it) and lone surrogates
    # (not encodable as UTF-8) would fail later, in the database or a log.
    if not value.isprintable():
        raise Rejected(f"agent_version: {_show(value)} contains unprintable characters")
    return value


def _read_errors(value: object) -> dict[str, int]:
    if type(value) is not dict:
        raise _wrong_type("read_errors", value, "an object of sensor id to count")
    if len(value) > _MAX_READ_ERRORS:
        raise Rejected(f"read_errors: {len(value)} entries, at most {_MAX_READ_ERRORS} are allowed")
    counts: dict[str, int] = {}
    for sensor, count in value.items():
        counts[_id(sensor, "read_errors")] = _integer(
            count, f"read_errors[{_show(sensor)}]", MAX_COUNTER
        )
    return counts
