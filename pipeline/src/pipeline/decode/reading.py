"""Readings: the v1 form (``gateway/schema/reading.v1.schema.json``) and the course's legacy
form (``legacy.schema.json``), decoded field by field, each rejection with its reason.

What a kind may report (its temperature range, which optional fields it measures and their
ranges, how a reason names its range) comes from :mod:`tempmon_contract.kinds`; this module
holds no table of its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Final, NamedTuple

from pipeline.decode._common import (
    _bounded_time,
    _bounds,
    _check_version,
    _id,
    _integer,
    _load_object,
    _missing,
    _number,
    _same_as_topic,
    _sensor_key,
    _show,
    _unknown_fields,
    _utc_time,
    _wrong_type,
)
from pipeline.errors import Rejected
from tempmon_contract.ids import ID
from tempmon_contract.kinds import (
    HUMIDITY,
    KINDS,
    LEGACY,
    OPTIONAL_QUANTITIES,
    PRESSURE,
    TEMPERATURE,
    Kind,
)
from tempmon_contract.wire import MAX_SEQ, READING_FIELDS, READING_REQUIRED

__all__ = ["LEGACY_KIND", "LEGACY_NODE", "Reading", "decode_reading_full"]

LEGACY_KIND: Final = LEGACY.name
"""``Reading.kind`` of a reading that arrived in the course's legacy form."""

LEGACY_NODE: Final = "legacy"
"""``Reading.node`` of a legacy reading whose routing key is not ``sensors.<node>.<sensor>``."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

_V1_REQUIRED_SET: Final = frozenset(READING_REQUIRED)
_V1_FIELDS: Final = frozenset(READING_FIELDS)
_LEGACY_FIELDS: Final = ("id", "data", "temperatura")
_LEGACY_FIELD_SET: Final = frozenset(_LEGACY_FIELDS)
_KIND_NAMES: Final = ", ".join(sorted(KINDS))


def _only(field: str) -> str:
    """For a reason: which kinds measure ``field`` (``only dht22, simulated and bme280 do``)."""
    names = [spec.name for spec in KINDS.values() if field in spec.measures]
    if not names:
        return "no kind does"
    if len(names) == 1:
        return f"only {names[0]} does"
    return f"only {', '.join(names[:-1])} and {names[-1]} do"


_ONLY: Final[Mapping[str, str]] = MappingProxyType(
    {quantity.field: _only(quantity.field) for quantity in OPTIONAL_QUANTITIES}
)

# The legacy `data`: ISO 8601 with `T` or a space, seconds required, optional fraction, optional
# offset (`Z`, `+HH:MM` or `+HHMM`); without an offset the time is taken as UTC.
_LEGACY_TIME: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(Z|[+-](?:[01][0-9]|2[0-3]):?[0-5][0-9])?"
)


class Reading(NamedTuple):
    """One reading, validated.

    ``(node, sensor, seq)`` identifies it: a redelivered or replayed message decodes to the same
    key. For a legacy reading ``seq`` is its time in milliseconds since the Unix epoch, so two
    legacy readings of one sensor within the same millisecond count as one reading.
    ``humidity_pct`` and ``pressure_hpa`` are set only for kinds that measure them
    (:attr:`tempmon_contract.kinds.Kind.measures`), and only when the reading carried them.

    A named tuple, not a frozen dataclass: one is made per message on the consumer's hot path,
    and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost about
    2 us of the consumer's per-message budget. Fields added later go last, with a default, so
    code that builds one positionally keeps working.
    """

    node: str
    sensor: str
    kind: str
    seq: int
    ts: datetime  # aware, UTC
    temperature_c: float
    humidity_pct: float | None
    time_uncertain: bool
    pressure_hpa: float | None = None


def decode_reading_full(body: bytes, routing_key: str, *, now: datetime) -> Reading:
    """:func:`pipeline.decode.decode_reading` without its fast path: the full decoder, which
    gives every rejection its reason (the fast path's results are held to this one's by the
    tests)."""
    obj = _load_object(body)
    if "version" in obj:
        return _decode_v1(obj, routing_key, now)
    if "temperatura" in obj:
        return _decode_legacy(obj, routing_key, now)
    keys = ", ".join(_show(key) for key in list(obj)[:3]) + (", ..." if len(obj) > 3 else "")
    raise Rejected(
        f"payload: keys [{keys}] are neither a v1 reading ({', '.join(READING_REQUIRED)})"
        f" nor the legacy form ({', '.join(_LEGACY_FIELDS)})"
    )


def _temperature(value: object, field: str, spec: Kind) -> float:
    number = _number(value, field)
    low, high = spec.temperature
    # The comparison also rejects inf, which json parses from literals like 1e400.
    if not low <= number <= high:
        raise Rejected(
            f"{field}: {_show(number)} is outside what {spec.phrase} ({_bounds(low, high)})"
        )
    return float(number)


def _optional(obj: Mapping[str, object], field: str, name: str, spec: Kind) -> float | None:
    """An optional measured field (``humidity_pct``, ``pressure_hpa``): None when absent."""
    raw = obj.get(field)
    if raw is None:
        return None
    if field not in spec.measures:
        raise Rejected(
            f"{field}: {_show(raw)} given for a {spec.name}, which measures no {name}"
            f" ({_ONLY[field]})"
        )
    value = _number(raw, field)
    low, high = spec.range_of(field)
    if not low <= value <= high:
        raise Rejected(f"{field}: {_show(value)} is outside {_bounds(low, high)}")
    return float(value)


def _decode_v1(obj: dict[str, object], routing_key: str, now: datetime) -> Reading:
    _check_version(obj)
    topic = _sensor_key(routing_key)
    if topic is None:
        raise Rejected(f"routing key: {_show(routing_key)} is not sensors.<node>.<sensor>")
    if not obj.keys() <= _V1_FIELDS:
        raise _unknown_fields(obj, _V1_FIELDS, "a v1 reading")
    if not obj.keys() >= _V1_REQUIRED_SET:
        raise _missing(next(field for field in READING_REQUIRED if field not in obj))
    node = _same_as_topic(obj, "node", topic[0])
    sensor = _same_as_topic(obj, "sensor", topic[1])
    kind = obj["kind"]
    if type(kind) is not str:
        raise _wrong_type("kind", kind, "one of " + _KIND_NAMES)
    spec = KINDS.get(kind)
    if spec is None:
        raise Rejected(f"kind: {_show(kind)} is not one of {_KIND_NAMES}")
    seq = _integer(obj["seq"], "seq", MAX_SEQ)
    ts = _utc_time(obj["ts"], "ts", now)
    temperature = _temperature(obj[TEMPERATURE.field], TEMPERATURE.field, spec)
    humidity = _optional(obj, HUMIDITY.field, HUMIDITY.name, spec)
    pressure = _optional(obj, PRESSURE.field, PRESSURE.name, spec)
    time_uncertain = obj.get("time_uncertain", False)
    if type(time_uncertain) is not bool:
        raise _wrong_type("time_uncertain", time_uncertain, "true or false")
    return Reading(node, sensor, kind, seq, ts, temperature, humidity, time_uncertain, pressure)


def _decode_legacy(obj: dict[str, object], routing_key: str, now: datetime) -> Reading:
    if not obj.keys() <= _LEGACY_FIELD_SET:
        raise _unknown_fields(obj, _LEGACY_FIELD_SET, "the legacy form")
    for field in _LEGACY_FIELDS:
        if field not in obj:
            raise _missing(field)
    raw_id = obj["id"]
    if type(raw_id) is int:
        sensor = str(raw_id)
        if ID.fullmatch(sensor) is None:
            raise Rejected(f"id: {_show(raw_id)} is too long for an id (at most 64 characters)")
    elif type(raw_id) is str:
        sensor = _id(raw_id, "id")
    else:
        raise _wrong_type("id", raw_id, "a string or an integer")
    ts = _legacy_time(obj["data"], now)
    temperature = _temperature(obj["temperatura"], "temperatura", LEGACY)
    topic = _sensor_key(routing_key)
    node = LEGACY_NODE if topic is None else topic[0]
    # Legacy messages carry no sequence number: the reading's millisecond stands in for one.
    seq = (ts - _EPOCH) // _ONE_MS
    return Reading(node, sensor, LEGACY_KIND, seq, ts, temperature, None, False)


def _legacy_time(value: object, now: datetime) -> datetime:
    if type(value) is not str:
        raise _wrong_type("data", value, "a time string like '2025-06-01 12:00:00'")
    match = _LEGACY_TIME.fullmatch(value)
    if match is None:
        raise Rejected(
            f"data: {_show(value)} is not a time like '2025-06-01 12:00:00'"
            " or '2025-06-01T12:00:00+00:00'"
        )
    try:
        ts = datetime.fromisoformat(value)
    except ValueError as exc:
        raise Rejected(f"data: {_show(value)} is not a valid time ({exc})") from None
    # The course's sensors sent naive times; the contract takes them as UTC.
    if match.group(1) is None:
        return _bounded_time(ts.replace(tzinfo=UTC), value, "data", now)
    # Bounds first, on the time with its own offset (comparing and subtracting aware times
    # never overflows), and only then the conversion: `9999-12-31 23:59:59-23:59` is past the
    # end of `datetime` in UTC, and `astimezone` would raise OverflowError, which is not a
    # reason but a decoder failure with a traceback per message.
    ts = _bounded_time(ts, value, "data", now)
    try:
        return ts.astimezone(UTC)
    except OverflowError:  # unreachable while `now` is a real clock; kept so nothing escapes
        raise Rejected(
            f"data: {_show(value)} is outside the times this pipeline can store"
        ) from None
