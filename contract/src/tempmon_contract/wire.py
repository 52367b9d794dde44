"""The v1 messages as bytes: the one encoder of readings and status messages.

``gateway/schema/*.v1.schema.json`` is the published definition; the edge agent sends what
this module writes, the pipeline's decoder reads it (its fast path takes exactly this form),
and ``tests/unit/test_contract.py`` holds the three to each other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

from tempmon_contract.ids import ID, ID_RULE, SESSION, SESSION_RULE
from tempmon_contract.kinds import KINDS, OPTIONAL_QUANTITIES, TEMPERATURE

__all__ = [
    "MAX_COUNTER",
    "MAX_PAYLOAD_BYTES",
    "MAX_SEQ",
    "READING_FIELDS",
    "READING_REQUIRED",
    "STATES",
    "STATUS_FIELDS",
    "STATUS_REQUIRED",
    "VERSION",
    "format_ts",
    "reading_payload",
    "status_payload",
    "utc_iso",
]

VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 4096
"""Largest payload the pipeline accepts, checked before parsing (a reading is about 200 bytes)."""
MAX_SEQ: Final = 2**63 - 1
"""Largest ``seq`` (PostgreSQL BIGINT)."""
MAX_COUNTER: Final = 2**63 - 1
"""Largest status counter (stored as BIGINT too)."""
STATES: Final = frozenset({"online", "offline"})

READING_REQUIRED: Final = ("version", "node", "sensor", "kind", "seq", "ts", TEMPERATURE.field)
"""The fields every v1 reading has, in wire order."""
READING_FIELDS: Final = (
    *READING_REQUIRED,
    *(quantity.field for quantity in OPTIONAL_QUANTITIES),
    "time_uncertain",
)
"""Every field a v1 reading may have, in wire order."""
STATUS_REQUIRED: Final = ("version", "node", "state")
STATUS_FIELDS: Final = (
    *STATUS_REQUIRED,
    "session",
    "ts",
    "agent_version",
    "uptime_s",
    "outbox_depth",
    "dropped",
    "read_errors",
)


def utc_iso(ts: float) -> str:
    """UTC seconds as RFC 3339 with milliseconds and ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_ts(ts: datetime) -> str:
    """An aware time as RFC 3339 in UTC with ``Z``: to the millisecond, or to the microsecond
    when it has one.

    Raises:
        ValueError: ``ts`` is naive.
    """
    if ts.utcoffset() is None:
        raise ValueError(f"ts {ts.isoformat()} is naive: give it a time zone")
    naive = ts.astimezone(UTC).replace(tzinfo=None)
    spec = "milliseconds" if naive.microsecond % 1000 == 0 else "microseconds"
    return naive.isoformat(timespec=spec) + "Z"


def reading_payload(
    *,
    node: str,
    sensor: str,
    kind: str,
    seq: int,
    ts: float | datetime,
    temperature_c: float,
    humidity_pct: float | None = None,
    pressure_hpa: float | None = None,
    time_uncertain: bool = False,
) -> bytes:
    """A v1 reading: compact JSON, the fields in wire order, defaults left out.

    ``ts`` is UTC seconds (written to the millisecond) or an aware ``datetime`` (see
    :func:`format_ts`). Each measured value is rounded to its quantity's ``decimals``.

    Raises:
        ValueError: the message would not be accepted by the pipeline: an id that is not one,
            a kind the contract lacks, a ``seq`` outside 0..2**63-1, a value that is not
            finite or lies outside what the kind can measure, or a field the kind does not
            measure. The message names the field and the value.
    """
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    for field, name in (("node", node), ("sensor", sensor)):
        if type(name) is not str or ID.fullmatch(name) is None:
            raise ValueError(f"{field}: {name!r} is not an id ({ID_RULE})")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq: {seq!r} is outside 0..{MAX_SEQ}")
    body: dict[str, object] = {
        "version": VERSION,
        "node": node,
        "sensor": sensor,
        "kind": kind,
        "seq": seq,
        "ts": utc_iso(ts) if isinstance(ts, int | float) else format_ts(ts),
        TEMPERATURE.field: _measured(spec.name, TEMPERATURE.field, temperature_c),
    }
    extras: dict[str, float | None] = {"humidity_pct": humidity_pct, "pressure_hpa": pressure_hpa}
    for quantity in OPTIONAL_QUANTITIES:
        value = extras[quantity.field]
        if value is None:
            continue
        if quantity.field not in spec.measures:
            raise ValueError(
                f"{quantity.field}: {value!r} given for a {kind}, which measures no {quantity.name}"
            )
        body[quantity.field] = _measured(spec.name, quantity.field, value)
    if time_uncertain:
        body["time_uncertain"] = True
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _measured(kind: str, field: str, value: float) -> float:
    spec = KINDS[kind]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field}: {value!r} is not a finite number")
    decimals = TEMPERATURE.decimals
    for quantity in OPTIONAL_QUANTITIES:
        if quantity.field == field:
            decimals = quantity.decimals
    rounded = round(float(value), decimals)
    low, high = spec.range_of(field)
    if not low <= rounded <= high:
        raise ValueError(f"{field}: {value!r} is outside what {spec.phrase} ({low:g}..{high:g})")
    return rounded


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
        ValueError: ``session`` is not 16 lowercase hex digits, or ``state`` is not
            ``online`` or ``offline``.
    """
    if state not in STATES:
        raise ValueError(f"state: {state!r} is not 'online' or 'offline'")
    body: dict[str, object] = {"version": VERSION, "node": node, "state": state}
    if session is not None:
        if not SESSION.fullmatch(session):
            raise ValueError(f"session {session!r} is not {SESSION_RULE}")
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
