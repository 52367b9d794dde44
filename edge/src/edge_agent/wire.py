"""The wire contract v1 as the agent writes it (gateway/schema/ is the definition).

The tests hold these bytes to the JSON Schema and to the pipeline's decoder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime

__all__ = ["reading_payload", "reading_topic", "status_payload", "status_topic", "utc_iso"]

VERSION = 1
_SESSION = re.compile(r"[0-9a-f]{16}")


def utc_iso(ts: float) -> str:
    """UTC seconds as RFC 3339 with milliseconds and ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reading_topic(node: str, sensor: str) -> str:
    return f"sensors/{node}/{sensor}"


def status_topic(node: str) -> str:
    return f"status/{node}"


def reading_payload(
    *,
    node: str,
    sensor: str,
    kind: str,
    seq: int,
    ts: float,
    temperature_c: float,
    humidity_pct: float | None = None,
    time_uncertain: bool = False,
) -> bytes:
    body: dict[str, object] = {
        "version": VERSION,
        "node": node,
        "sensor": sensor,
        "kind": kind,
        "seq": seq,
        "ts": utc_iso(ts),
        "temperature_c": round(temperature_c, 4),
    }
    if humidity_pct is not None:
        body["humidity_pct"] = round(humidity_pct, 3)
    if time_uncertain:
        body["time_uncertain"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def status_payload(
    *,
    node: str,
    state: str,
    session: str | None = None,
    ts: float | None = None,
    agent_version: str | None = None,
    uptime_s: float | None = None,
    outbox_depth: int | None = None,
    dropped: int | None = None,
    read_errors: Mapping[str, int] | None = None,
) -> bytes:
    """A status message; the Last Will carries only version, node, state and session.

    ``session`` identifies the MQTT connection the status belongs to (16 lowercase hex digits,
    a new one for each connection): the pipeline applies an ``offline`` only to its own
    connection, so a late Last Will cannot mark a node offline that has reconnected since.

    Raises:
        ValueError: ``session`` is not 16 lowercase hex digits.
    """
    body: dict[str, object] = {"version": VERSION, "node": node, "state": state}
    if session is not None:
        if not _SESSION.fullmatch(session):
            raise ValueError(f"session {session!r} is not 16 lowercase hex digits")
        body["session"] = session
    if ts is not None:
        body["ts"] = utc_iso(ts)
    if agent_version is not None:
        body["agent_version"] = agent_version
    if uptime_s is not None:
        body["uptime_s"] = round(uptime_s, 1)
    if outbox_depth is not None:
        body["outbox_depth"] = outbox_depth
    if dropped is not None:
        body["dropped"] = dropped
    if read_errors is not None:
        body["read_errors"] = dict(read_errors)
    return json.dumps(body, separators=(",", ":")).encode()
