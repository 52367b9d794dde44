"""Decode and validate the messages on the ``readings`` and ``node-status`` queues.

The wire contract is documented in ``gateway/schema/`` (JSON Schema files and README). This
module is its executable form on the consumer's hot path, so it uses plain Python checks
instead of a schema validator: a typical reading decodes in a few microseconds.

Every function here either returns a value that is safe to write to PostgreSQL or raises
:class:`~pipeline.errors.Rejected`, whose ``reason`` names the field and the offending value
(clipped, and escaped by ``repr``, so a hostile payload cannot flood a log line or an AMQP
header). Nothing else escapes for any input ``bytes`` and routing key.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, NamedTuple, NoReturn

from pipeline.errors import Rejected

__all__ = [
    "HUMIDITY_KINDS",
    "KINDS",
    "LEGACY_KIND",
    "LEGACY_NODE",
    "MAX_PAYLOAD_BYTES",
    "TEMPERATURE_RANGES",
    "NodeStatus",
    "Reading",
    "decode_reading",
    "decode_reading_fast",
    "decode_reading_full",
    "decode_status",
    "encode_reading",
]

MAX_PAYLOAD_BYTES: Final = 4096
"""Largest payload accepted, checked before parsing (a reading is about 200 bytes)."""

KINDS: Final[frozenset[str]] = frozenset({"ds18b20", "dht22", "cpu", "simulated"})
"""The sensor kinds a v1 reading may name."""

HUMIDITY_KINDS: Final[frozenset[str]] = frozenset({"dht22", "simulated"})
"""The kinds that may carry ``humidity_pct``."""

LEGACY_KIND: Final = "legacy"
"""``Reading.kind`` of a reading that arrived in the course's legacy form."""

LEGACY_NODE: Final = "legacy"
"""``Reading.node`` of a legacy reading whose routing key is not ``sensors.<node>.<sensor>``."""

TEMPERATURE_RANGES: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {
        # Datasheet ranges: DS18B20 -55..+125 °C, DHT22 (AM2302) -40..+80 °C; the BCM SoC's
        # sensor is specified -40..+85 °C and reads up to its 125 °C limit before shutdown.
        "ds18b20": (-55, 125),
        "dht22": (-40, 80),
        "cpu": (-40, 125),
        "simulated": (-100, 150),
        LEGACY_KIND: (-100, 150),
    }
)
"""Inclusive temperature range in °C by kind (legacy readings included)."""

_VERSION: Final = 1
_MAX_SEQ: Final = 2**63 - 1  # PostgreSQL BIGINT
_MAX_COUNTER: Final = 2**63 - 1  # status counters are stored as BIGINT too
_MAX_FUTURE: Final = timedelta(seconds=300)
_EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_MAX_AGENT_VERSION: Final = 64
_MAX_UPTIME_S: Final = 1e12  # about 31,700 years
_MAX_READ_ERRORS: Final = 64
_SHOW_MAX: Final = 60
_STATES: Final = frozenset({"online", "offline"})

_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# One MQTT connection of an agent: 64 random bits as lowercase hex (gateway/schema/status.v1).
_SESSION: Final = re.compile(r"[0-9a-f]{16}")
# RFC 3339 date-time, shape only (fromisoformat checks the calendar). [0-9], not \d: \d would
# accept other scripts' digits.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)
# The legacy `data`: ISO 8601 with `T` or a space, seconds required, optional fraction, optional
# offset (`Z`, `+HH:MM` or `+HHMM`); without an offset the time is taken as UTC.
_LEGACY_TIME: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(Z|[+-](?:[01][0-9]|2[0-3]):?[0-5][0-9])?"
)
_UTC_SUFFIXES: Final = frozenset({"Z", "+00:00"})

_V1_REQUIRED: Final = ("version", "node", "sensor", "kind", "seq", "ts", "temperature_c")
_V1_REQUIRED_SET: Final = frozenset(_V1_REQUIRED)
_V1_FIELDS: Final = frozenset({*_V1_REQUIRED, "humidity_pct", "time_uncertain"})
_LEGACY_FIELDS: Final = ("id", "data", "temperatura")
_LEGACY_FIELD_SET: Final = frozenset(_LEGACY_FIELDS)
_STATUS_REQUIRED: Final = ("version", "node", "state")
_STATUS_FIELDS: Final = frozenset(
    {
        *_STATUS_REQUIRED,
        "ts",
        "agent_version",
        "uptime_s",
        "outbox_depth",
        "dropped",
        "read_errors",
        "session",
    }
)


class Reading(NamedTuple):
    """One temperature reading, validated.

    ``(node, sensor, seq)`` identifies it: a redelivered or replayed message decodes to the same
    key. For a legacy reading ``seq`` is its time in milliseconds since the Unix epoch, so two
    legacy readings of one sensor within the same millisecond count as one reading.

    A named tuple, not a frozen dataclass: one is made per message on the consumer's hot path,
    and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost about
    2 us of the consumer's per-message budget.
    """

    node: str
    sensor: str
    kind: str
    seq: int
    ts: datetime  # aware, UTC
    temperature_c: float
    humidity_pct: float | None
    time_uncertain: bool


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


# --- reasons -----------------------------------------------------------------------------------


def _show(value: object) -> str:
    """``repr`` of a value, clipped to ``_SHOW_MAX`` characters: the value comes from the network.

    The text is built piece by piece (:func:`_pieces`) and building stops as soon as it is
    longer than what is shown, so the cost is bounded by ``_SHOW_MAX`` and not by the value:
    ``repr`` of an array nested a thousand levels deep (which fits in the 4 KiB payload limit)
    builds a string per level, quadratic in the depth, and cost about 80 times a valid
    reading's decode, only to be clipped to 60 characters. Nothing recurses, so no depth can
    raise ``RecursionError``. For values that fit, the text is exactly ``repr``'s (``null``
    for None at the top level).
    """
    if value is None:
        return "null"
    pieces: list[str] = []
    length = 0
    for piece in _pieces(value, _SHOW_MAX + 1):
        pieces.append(piece)
        length += len(piece)
        if length > _SHOW_MAX:
            break  # the rest of the value is never looked at
    shown = "".join(pieces)
    if length > _SHOW_MAX:
        return shown[: _SHOW_MAX - 3] + "..."
    return shown


def _pieces(value: object, limit: int) -> Iterator[str]:
    """``repr``'s text of a JSON value, in pieces, lazily and without recursion."""
    # Open containers, innermost last: (entries left, closing bracket, is a dict).
    frames: list[tuple[Iterator[Any], str, bool]] = []
    item: object = value
    while True:
        if type(item) is list:
            yield "["
            frames.append((iter(item), "]", False))
            first = True
        elif type(item) is dict:
            yield "{"
            frames.append((iter(item.items()), "}", True))
            first = True
        else:
            yield _show_scalar(item, limit)
            first = False
        while True:  # the next entry of the innermost open container, closing finished ones
            if not frames:
                return
            entries, closing, is_dict = frames[-1]
            entry: Any = next(entries, _NO_ENTRY)
            if entry is not _NO_ENTRY:
                break
            frames.pop()
            yield closing
            first = False
        if not first:
            yield ", "
        if is_dict:
            key, item = entry
            yield _show_scalar(key, limit) + ": "
        else:
            item = entry


_NO_ENTRY: Final = object()


def _show_scalar(value: object, limit: int) -> str:
    """``repr`` of a value that is not a list or dict, for :func:`_show`; at most a few times
    ``limit`` characters for a string (only its first ``limit`` characters are looked at).

    A longer string's text may choose its quotes differently from ``repr`` of the whole
    string (the prefix may lack the quote that made ``repr`` switch); it is clipped anyway.
    """
    if type(value) is str and len(value) > limit:
        return repr(value[:limit])
    # int, float, bool, None and short strings: JSON limits an integer literal to 4300
    # digits and the payload to 4 KiB, so this is bounded too.
    return repr(value)


_TYPE_NAMES: Final[Mapping[type, str]] = MappingProxyType(
    {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
)
_JSON_NAMES: Final[Mapping[type, str]] = MappingProxyType(
    {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
)


def _wrong_type(field: str, value: object, expected: str) -> Rejected:
    if value is None:
        return Rejected(f"{field}: null, expected {expected}")
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return Rejected(f"{field}: {_show(value)} is {kind}, expected {expected}")


def _missing(field: str) -> Rejected:
    return Rejected(f"{field}: missing")


def _unknown_fields(obj: Mapping[str, object], allowed: frozenset[str], what: str) -> Rejected:
    unknown = [key for key in obj if key not in allowed]
    shown = ", ".join(_show(key) for key in unknown[:3])
    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
    noun = "field" if len(unknown) == 1 else "fields"
    return Rejected(
        f"payload: unknown {noun} {shown}{more} ({what} allows only {', '.join(sorted(allowed))})"
    )


# --- JSON --------------------------------------------------------------------------------------


def _reject_constant(token: str) -> NoReturn:
    raise Rejected(f"payload: {token} is not JSON (send a finite number, or leave the field out)")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Rejected(f"payload: key {_show(key)} appears more than once")
            seen.add(key)
    return obj


# One decoder, built once: json.loads with keyword arguments builds a new one per call, which
# costs more than the parse. It keeps no state between calls.
_JSON: Final = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _load_object(body: bytes) -> dict[str, object]:
    """Size, UTF-8, JSON, object: in that order, so an oversize payload is never parsed."""
    size = len(body)
    if size > MAX_PAYLOAD_BYTES:
        raise Rejected(f"payload: {size} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            f"payload: not UTF-8 JSON (invalid UTF-8 at byte {exc.start}: {exc.reason})"
        ) from None
    try:
        value: object = _JSON.decode(text)
    except Rejected:
        raise
    except json.JSONDecodeError as exc:
        raise Rejected(
            f"payload: not UTF-8 JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise Rejected("payload: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than int() converts
        raise Rejected(f"payload: not usable JSON ({str(exc)[:_SHOW_MAX]})") from None
    if type(value) is not dict:
        kind = "null" if value is None else _JSON_NAMES.get(type(value), "value")
        raise Rejected(f"payload: JSON {kind}, expected an object")
    return value


# --- fields ------------------------------------------------------------------------------------


def _get(obj: Mapping[str, object], field: str) -> object:
    try:
        return obj[field]
    except KeyError:
        raise _missing(field) from None


def _check_version(obj: Mapping[str, object]) -> None:
    value = _get(obj, "version")
    if type(value) is not int:
        raise _wrong_type("version", value, "the integer 1")
    if value != _VERSION:
        raise Rejected(f"version: {_show(value)} is not supported (this pipeline reads version 1)")


def _id(value: object, field: str) -> str:
    if type(value) is not str:
        raise _wrong_type(field, value, "a string of 1 to 64 letters, digits, '_' or '-'")
    if _ID.fullmatch(value) is None:
        raise Rejected(
            f"{field}: {_show(value)} is not an id (1 to 64 letters, digits, '_' or '-')"
        )
    return value


def _integer(value: object, field: str, maximum: int) -> int:
    if type(value) is not int:
        raise _wrong_type(field, value, "an integer")
    if not 0 <= value <= maximum:
        raise Rejected(f"{field}: {_show(value)} is outside 0..{maximum}")
    return value


def _number(value: object, field: str) -> float | int:
    if type(value) is not float and type(value) is not int:
        raise _wrong_type(field, value, "a number")
    return value


def _temperature(value: object, field: str, kind: str) -> float:
    number = _number(value, field)
    low, high = TEMPERATURE_RANGES[kind]
    # The comparison also rejects inf, which json parses from literals like 1e400.
    if not low <= number <= high:
        if kind == LEGACY_KIND:
            what = "the legacy form allows"
        elif kind == "simulated":
            what = "a simulated sensor may report"
        else:
            what = f"a {kind} can measure"
        raise Rejected(f"{field}: {_show(number)} is outside what {what} ({low}..{high})")
    return float(number)


def _bounded_time(ts: datetime, text: str, field: str, now: datetime) -> datetime:
    ahead = ts - now
    if ahead > _MAX_FUTURE:
        raise Rejected(
            f"{field}: {_show(text)} is {int(ahead.total_seconds())} s in the future (clock wrong?)"
        )
    if ts < _EARLIEST:
        raise Rejected(
            f"{field}: {_show(text)} is before 2000-01-01 (the node's clock was never set?)"
        )
    return ts


def _utc_time(value: object, field: str, now: datetime) -> datetime:
    if type(value) is not str:
        raise _wrong_type(field, value, "an RFC 3339 UTC time like '2025-06-01T12:00:00Z'")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise Rejected(
            f"{field}: {_show(value)} is not an RFC 3339 time like '2025-06-01T12:00:00.000Z'"
        )
    if match.group(1) not in _UTC_SUFFIXES:
        raise Rejected(f"{field}: {_show(value)} must be UTC (end in Z or +00:00)")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError as exc:
        raise Rejected(f"{field}: {_show(value)} is not a valid time ({exc})") from None
    return _bounded_time(ts, value, field, now)


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


@functools.lru_cache(maxsize=4096)
def _sensor_key(routing_key: str) -> tuple[str, str] | None:
    """``(node, sensor)`` of ``sensors.<node>.<sensor>``, else None.

    Cached: a deployment has a few hundred sensors, and the lookup is cheaper than two regexes.
    """
    parts = routing_key.split(".")
    if (
        len(parts) != 3
        or parts[0] != "sensors"
        or _ID.fullmatch(parts[1]) is None
        or _ID.fullmatch(parts[2]) is None
    ):
        return None
    return parts[1], parts[2]


def _same_as_topic(obj: Mapping[str, object], field: str, topic_value: str) -> str:
    """The payload's id, which must equal the (already validated) id in the routing key."""
    value = obj[field]
    if value == topic_value:
        return topic_value
    checked = _id(value, field)  # a wrong type or a malformed id gets its own reason
    raise Rejected(
        f"{field}: {_show(checked)} does not match the topic's {field} {_show(topic_value)}"
    )


# --- readings ----------------------------------------------------------------------------------


def decode_reading(body: bytes, routing_key: str, *, now: datetime) -> Reading:
    """Decode one delivery from the ``readings`` queue.

    A payload with a ``version`` key is a v1 reading and must arrive on
    ``sensors.<node>.<sensor>`` naming the same node and sensor; a payload with ``temperatura``
    and no ``version`` is the course's legacy form and may arrive on any routing key.

    Args:
        body: the message body as delivered.
        routing_key: the AMQP routing key (the MQTT topic with ``/`` turned into ``.``).
        now: the receiver's current time, aware; readings more than 300 s after it are rejected.

    Raises:
        Rejected: for any payload or routing key that cannot become a row; ``reason`` says why.
        TypeError: only if ``now`` is naive (a caller's bug, not an input's).
    """
    fast = decode_reading_fast(body, routing_key, now=now)
    if fast is not None:
        return fast
    return decode_reading_full(body, routing_key, now=now)


def decode_reading_full(body: bytes, routing_key: str, *, now: datetime) -> Reading:
    """:func:`decode_reading` without its fast path: the full decoder, which gives every
    rejection its reason (the fast path's results are held to this one's by the tests)."""
    obj = _load_object(body)
    if "version" in obj:
        return _decode_v1(obj, routing_key, now)
    if "temperatura" in obj:
        return _decode_legacy(obj, routing_key, now)
    keys = ", ".join(_show(key) for key in list(obj)[:3]) + (", ..." if len(obj) > 3 else "")
    raise Rejected(
        f"payload: keys [{keys}] are neither a v1 reading (version, node, sensor, kind, seq, ts,"
        " temperature_c) nor the legacy form (id, data, temperatura)"
    )


def _decode_v1(obj: dict[str, object], routing_key: str, now: datetime) -> Reading:
    _check_version(obj)
    topic = _sensor_key(routing_key)
    if topic is None:
        raise Rejected(f"routing key: {_show(routing_key)} is not sensors.<node>.<sensor>")
    if not obj.keys() <= _V1_FIELDS:
        raise _unknown_fields(obj, _V1_FIELDS, "a v1 reading")
    if not obj.keys() >= _V1_REQUIRED_SET:
        raise _missing(next(field for field in _V1_REQUIRED if field not in obj))
    node = _same_as_topic(obj, "node", topic[0])
    sensor = _same_as_topic(obj, "sensor", topic[1])
    kind = obj["kind"]
    if type(kind) is not str:
        raise _wrong_type("kind", kind, "one of " + ", ".join(sorted(KINDS)))
    if kind not in KINDS:
        raise Rejected(f"kind: {_show(kind)} is not one of {', '.join(sorted(KINDS))}")
    seq = _integer(obj["seq"], "seq", _MAX_SEQ)
    ts = _utc_time(obj["ts"], "ts", now)
    temperature = _temperature(obj["temperature_c"], "temperature_c", kind)
    humidity: float | None = None
    raw_humidity = obj.get("humidity_pct")
    if raw_humidity is not None:
        if kind not in HUMIDITY_KINDS:
            raise Rejected(
                f"humidity_pct: {_show(raw_humidity)} given for a {kind}, which measures no"
                " humidity (only dht22 and simulated do)"
            )
        value = _number(raw_humidity, "humidity_pct")
        if not 0 <= value <= 100:
            raise Rejected(f"humidity_pct: {_show(value)} is outside 0..100")
        humidity = float(value)
    time_uncertain = obj.get("time_uncertain", False)
    if type(time_uncertain) is not bool:
        raise _wrong_type("time_uncertain", time_uncertain, "true or false")
    return Reading(node, sensor, kind, seq, ts, temperature, humidity, time_uncertain)


def _decode_legacy(obj: dict[str, object], routing_key: str, now: datetime) -> Reading:
    if not obj.keys() <= _LEGACY_FIELD_SET:
        raise _unknown_fields(obj, _LEGACY_FIELD_SET, "the legacy form")
    for field in _LEGACY_FIELDS:
        if field not in obj:
            raise _missing(field)
    raw_id = obj["id"]
    if type(raw_id) is int:
        sensor = str(raw_id)
        if _ID.fullmatch(sensor) is None:
            raise Rejected(f"id: {_show(raw_id)} is too long for an id (at most 64 characters)")
    elif type(raw_id) is str:
        sensor = _id(raw_id, "id")
    else:
        raise _wrong_type("id", raw_id, "a string or an integer")
    ts = _legacy_time(obj["data"], now)
    temperature = _temperature(obj["temperatura"], "temperatura", LEGACY_KIND)
    topic = _sensor_key(routing_key)
    node = LEGACY_NODE if topic is None else topic[0]
    # Legacy messages carry no sequence number: the reading's millisecond stands in for one.
    seq = (ts - _EPOCH) // _ONE_MS
    return Reading(node, sensor, LEGACY_KIND, seq, ts, temperature, None, False)


# --- the fast path for canonical readings ------------------------------------------------------
#
# Almost every reading arrives exactly as the agents write it (edge_agent.wire): compact JSON,
# the fields in contract order, defaults left out. For such a payload msgspec parses and
# type-checks the whole object in one step in C, a tenth of the pure-Python path's cost. The
# fast path takes a payload only when re-encoding what msgspec read gives back the very same
# bytes: that rules out duplicate keys, unknown fields, explicit nulls, integers written for
# floats, escapes and any other form whose meaning the full decoder would have to judge. It
# never rejects anything itself: whatever it does not take (any failure, any check that does
# not pass) goes to the full decoder, which accepts or rejects it with its reason. So the
# results are the full decoder's by construction, and tests/unit/test_decode_fast.py holds the
# two to each other on generated payloads. Without msgspec (a platform without its wheels) the
# full decoder alone runs.

try:
    import msgspec
except ImportError:  # pragma: no cover - the platforms we test all have msgspec
    msgspec = None  # type: ignore[assignment]

if msgspec is not None:

    class _CanonicalV1(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
        """A v1 reading in the agents' own form (field order is the wire order)."""

        version: int
        node: str
        sensor: str
        kind: str
        seq: int
        ts: str
        temperature_c: float
        humidity_pct: float | None = None
        time_uncertain: bool = False

    _FAST_DECODER: Final = msgspec.json.Decoder(_CanonicalV1)
    _FAST_ENCODE: Final = msgspec.json.Encoder().encode
    _FAST_ERRORS: Final = (msgspec.DecodeError, Rejected)

_V1_RANGES: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {kind: TEMPERATURE_RANGES[kind] for kind in KINDS}
)


def decode_reading_fast(body: bytes, routing_key: str, *, now: datetime) -> Reading | None:
    """The reading of a canonical, valid v1 payload, or None: then :func:`decode_reading`
    decides (and gives the reason if it rejects). Never raises for any input."""
    if msgspec is None or len(body) > MAX_PAYLOAD_BYTES:
        return None
    try:
        m = _FAST_DECODER.decode(body)
        topic = _sensor_key(routing_key)
        kind, humidity = m.kind, m.humidity_pct
        limits = _V1_RANGES.get(kind)
        if (
            _FAST_ENCODE(m) != body
            or m.version != _VERSION
            or topic is None
            or m.node != topic[0]
            or m.sensor != topic[1]
            or limits is None
            or not limits[0] <= m.temperature_c <= limits[1]
            or not 0 <= m.seq <= _MAX_SEQ
            or (humidity is not None and (kind not in HUMIDITY_KINDS or not 0 <= humidity <= 100))
        ):
            return None
        ts = _utc_time(m.ts, "ts", now)
    except _FAST_ERRORS:
        return None
    return Reading(topic[0], topic[1], kind, m.seq, ts, m.temperature_c, humidity, m.time_uncertain)


# --- status ------------------------------------------------------------------------------------


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
    parts = routing_key.split(".")
    if len(parts) != 2 or parts[0] != "status" or _ID.fullmatch(parts[1]) is None:
        raise Rejected(f"routing key: {_show(routing_key)} is not status.<node>")
    if not obj.keys() <= _STATUS_FIELDS:
        raise _unknown_fields(obj, _STATUS_FIELDS, "a status message")
    for field in _STATUS_REQUIRED:
        if field not in obj:
            raise _missing(field)
    node = _same_as_topic(obj, "node", parts[1])
    state = obj["state"]
    if type(state) is not str:
        raise _wrong_type("state", state, "'online' or 'offline'")
    if state not in _STATES:
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
        _integer(obj["outbox_depth"], "outbox_depth", _MAX_COUNTER)
        if "outbox_depth" in obj
        else None
    )
    dropped = _integer(obj["dropped"], "dropped", _MAX_COUNTER) if "dropped" in obj else None
    read_errors = _read_errors(obj["read_errors"]) if "read_errors" in obj else None
    session = _session(obj["session"]) if "session" in obj else None
    return NodeStatus(
        node, state, ts, agent_version, uptime_s, outbox_depth, dropped, read_errors, session
    )


def _session(value: object) -> str:
    if type(value) is not str:
        raise _wrong_type("session", value, "16 lowercase hex digits")
    if _SESSION.fullmatch(value) is None:
        raise Rejected(
            f"session: {_show(value)} is not 16 lowercase hex digits (the connection's id)"
        )
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
            count, f"read_errors[{_show(sensor)}]", _MAX_COUNTER
        )
    return counts


# --- encoding ----------------------------------------------------------------------------------


def _format_ts(ts: datetime) -> str:
    naive = ts.astimezone(UTC).replace(tzinfo=None)
    spec = "milliseconds" if naive.microsecond % 1000 == 0 else "microseconds"
    return naive.isoformat(timespec=spec) + "Z"


def encode_reading(reading: Reading) -> bytes:
    """The canonical v1 payload of a reading: compact JSON, fields in contract order.

    ``ts`` is written in UTC with ``Z``, to the millisecond, or to the microsecond when it has
    one; ``humidity_pct`` and ``time_uncertain`` are left out at their defaults (None, False).

    Raises:
        ValueError: ``kind`` is not a v1 kind (a legacy reading has no v1 form), ``ts`` is
            naive, or a number is NaN or infinite.
    """
    if reading.kind not in KINDS:
        raise ValueError(
            f"kind {reading.kind!r} has no v1 form: a v1 reading's kind is one of"
            f" {', '.join(sorted(KINDS))}"
        )
    if reading.ts.utcoffset() is None:
        raise ValueError(f"ts {reading.ts.isoformat()} is naive: give it a time zone")
    doc: dict[str, object] = {
        "version": _VERSION,
        "node": reading.node,
        "sensor": reading.sensor,
        "kind": reading.kind,
        "seq": reading.seq,
        "ts": _format_ts(reading.ts),
        "temperature_c": float(reading.temperature_c),
    }
    if reading.humidity_pct is not None:
        doc["humidity_pct"] = float(reading.humidity_pct)
    if reading.time_uncertain:
        doc["time_uncertain"] = True
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
