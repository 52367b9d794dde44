"""Hostile input against pipeline.decode, checked with hypothesis.

These complement test_decode_properties.py (arbitrary bytes, arbitrary JSON, mutated and
damaged readings) with inputs shaped like attacks on an otherwise valid message:

- keys and values drawn from a hostile alphabet (quotes, backslashes, NUL and other control
  characters, line and paragraph separators, bidi overrides, dots and slashes, SQL fragments,
  lone surrogates), with the routing key built from the same hostile ids, so the id checks
  themselves are exercised rather than the topic check;
- huge integers and extreme number literals in every numeric field;
- values nested thousands of levels deep under valid keys;
- surrogates and invalid UTF-8 inside string fields, escaped and raw.

For all of them ``decode_reading`` and ``decode_status`` raise nothing but
:class:`pipeline.errors.Rejected`, whose reason is short, printable, and valid UTF-8 (it goes
into a log line and an AMQP header); and what they accept is still safe to store.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.decode import (
    LEGACY_KIND,
    MAX_PAYLOAD_BYTES,
    NodeStatus,
    Reading,
    decode_reading,
    decode_status,
)
from pipeline.errors import Rejected
from tempmon_contract.kinds import KINDS, LEGACY, PRESSURE

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The longest reason the decoder builds is "payload: unknown fields ..." naming three keys of
# at most 60 characters each plus the list of allowed fields: about 340 characters.
MAX_REASON = 350
HOSTILE = settings(max_examples=200, deadline=None)

VALID_READING: dict[str, Any] = {
    "version": 1,
    "node": "pi-01",
    "sensor": "t1",
    "kind": "simulated",
    "seq": 42,
    "ts": "2025-06-01T11:59:00.000Z",
    "temperature_c": 21.5,
    "humidity_pct": 40.0,
}
VALID_STATUS: dict[str, Any] = {
    "version": 1,
    "node": "pi-01",
    "state": "online",
    "ts": "2025-06-01T11:59:00.000Z",
    "agent_version": "1.0.0",
    "uptime_s": 10.5,
    "outbox_depth": 3,
    "dropped": 0,
    "read_errors": {"t1": 0},
}
VALID_LEGACY: dict[str, Any] = {"id": 3, "data": "2025-06-01 11:59:00", "temperatura": 21.5}
READING_KEY = "sensors.pi-01.t1"
STATUS_KEY = "status.pi-01"

# --- strategies --------------------------------------------------------------------------------

_HOSTILE_CHARS = (
    "'\"\\`;%_*?.,/:{}[]()<>|&$#!=+~ "
    "\x00\x01\x07\x08\t\n\x0b\x0c\r\x1b\x7f\x85\xa0"
    "\u00e9\u0130\u0660\u0966\uff10"  # é, dotted I, Arabic-Indic, Devanagari and full-width digits
    "\u2028\u2029\u200b\u200d\u202e\u2066\ufeff\ufffd"  # separators, zero-width, bidi, BOM
    "\ud800\udbff\udc00\udfff"  # lone surrogates
    "\U0001f600\U0010ffff"
    "aZ09-_"
)
_FRAGMENTS = [
    "'; DROP TABLE readings; --",
    '" OR 1=1 --',
    "pi-01'--",
    "$(reboot)",
    "../../etc/passwd",
    "sensors/pi-02/t1",
    "pi-01.t1",
    "a.b",
    "%00",
    "\\u0000",
    "NaN",
    "Infinity",
    "null",
    "{}",
    "[]",
    "x" * 65,
    "pi-01\x00",
    "pi-01\n",
    " pi-01",
    "pi-01 ",
    "",
]
hostile_text = st.one_of(
    st.text(st.sampled_from(_HOSTILE_CHARS), max_size=80),
    st.sampled_from(_FRAGMENTS),
    st.builds(
        "{}{}{}".format,
        st.sampled_from(["", "pi-01", "t1"]),
        st.sampled_from(_FRAGMENTS),
        st.text(st.sampled_from(_HOSTILE_CHARS), max_size=8),
    ),
)
hostile_values = st.one_of(
    hostile_text,
    st.lists(hostile_text, max_size=3),
    st.dictionaries(hostile_text, hostile_text, max_size=3),
    st.none(),
    st.booleans(),
)
huge_integers = st.one_of(
    st.integers(min_value=-(10**4000), max_value=10**4000),
    st.sampled_from(
        [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**100, -(10**300), 10**4000]
    ),
)
# Number literals written as raw JSON text: json.dumps cannot write most of them.
number_literals = st.sampled_from(
    [
        "1e400",
        "-1e400",
        "1E+999",
        "-0",
        "-0.0",
        "0e0",
        "5e-324",
        "1.7976931348623157e308",
        "1.7976931348623159e308",
        "0." + "0" * 3000 + "1",
        "1" + "0" * 3500,
        "9" * 4000,
        "-" + "9" * 4000,
        "21.5" + "0" * 3000,
    ]
)
Decoder = Callable[..., Reading | NodeStatus]
# The three message forms: a valid document, its routing key, its decoder.
FORMS: dict[str, tuple[dict[str, Any], str, Decoder]] = {
    "reading": (VALID_READING, READING_KEY, decode_reading),
    "status": (VALID_STATUS, STATUS_KEY, decode_status),
    "legacy": (VALID_LEGACY, READING_KEY, decode_reading),
}
READING_FIELDS = sorted(VALID_READING)
STATUS_FIELDS = sorted(VALID_STATUS)
LEGACY_FIELDS = sorted(VALID_LEGACY)


def _dump(value: object, *, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate in a non-ASCII dump becomes bytes that are not UTF-8.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _with_raw(doc: dict[str, Any], field: str, raw: str) -> bytes:
    """``doc`` as JSON with ``field``'s value replaced by the raw JSON text ``raw``."""
    marker = "\x00raw\x00"
    text = json.dumps({**doc, field: marker})
    return text.replace(json.dumps(marker), raw).encode("utf-8", "surrogatepass")


# --- checks ------------------------------------------------------------------------------------


def _check_reason(reason: object) -> None:
    assert isinstance(reason, str)
    assert 0 < len(reason) <= MAX_REASON, (len(reason), reason)
    assert ": " in reason, reason
    assert reason.isprintable(), f"control characters or surrogates in {reason!r}"
    reason.encode("utf-8")


def _attempt(decoder: Decoder, body: bytes, key: str) -> Any:
    """The decoded value, or None when rejected; any other exception fails the test."""
    try:
        return decoder(body, key, now=NOW)
    except Rejected as exc:
        _check_reason(exc.reason)
        return None


def _check_safe_reading(reading: Reading, key: str) -> None:
    """What the decoder accepted can be written to PostgreSQL and routed by its key."""
    assert ID.fullmatch(reading.node), reading.node
    assert ID.fullmatch(reading.sensor), reading.sensor
    assert reading.kind in {*KINDS, LEGACY_KIND}
    if reading.kind != LEGACY_KIND:
        assert key == f"sensors.{reading.node}.{reading.sensor}"
    assert type(reading.seq) is int
    assert 0 <= reading.seq <= 2**63 - 1
    spec = LEGACY if reading.kind == LEGACY_KIND else KINDS[reading.kind]
    low, high = spec.temperature
    assert type(reading.temperature_c) is float
    assert math.isfinite(reading.temperature_c)
    assert low <= reading.temperature_c <= high
    if reading.humidity_pct is not None:
        assert type(reading.humidity_pct) is float
        assert 0 <= reading.humidity_pct <= 100
    if reading.pressure_hpa is not None:
        assert PRESSURE.field in spec.measures
        assert type(reading.pressure_hpa) is float
        assert 300 <= reading.pressure_hpa <= 1100


def _check_safe_status(status: NodeStatus, key: str) -> None:
    assert ID.fullmatch(status.node)
    assert key == f"status.{status.node}"
    assert status.state in {"online", "offline"}
    if status.agent_version is not None:
        assert status.agent_version.isprintable()
        status.agent_version.encode("utf-8")
    for sensor, count in (status.read_errors or {}).items():
        assert ID.fullmatch(sensor)
        assert 0 <= count <= 2**63 - 1
    for counter in (status.outbox_depth, status.dropped):
        assert counter is None or 0 <= counter <= 2**63 - 1
    assert status.uptime_s is None or (math.isfinite(status.uptime_s) and status.uptime_s >= 0)


# --- properties --------------------------------------------------------------------------------


@HOSTILE
@given(
    changes=st.dictionaries(
        st.sampled_from(READING_FIELDS) | hostile_text, hostile_values, min_size=1, max_size=4
    ),
    ascii_only=st.booleans(),
)
def test_hostile_keys_and_values_in_a_reading(changes: dict[str, Any], ascii_only: bool) -> None:
    doc = {**VALID_READING, **changes}
    node, sensor = doc.get("node"), doc.get("sensor")
    # The routing key says what the payload says, hostile or not: the id checks must hold.
    keys = [READING_KEY]
    if isinstance(node, str) and isinstance(sensor, str):
        keys.append(f"sensors.{node}.{sensor}")
    body = _dump(doc, ascii_only=ascii_only)
    for key in keys:
        reading = _attempt(decode_reading, body, key)
        if reading is not None:
            _check_safe_reading(reading, key)


@HOSTILE
@given(
    changes=st.dictionaries(
        st.sampled_from(STATUS_FIELDS) | hostile_text, hostile_values, min_size=1, max_size=4
    ),
    errors=st.dictionaries(hostile_text, hostile_values | st.integers(), max_size=3),
    ascii_only=st.booleans(),
)
def test_hostile_keys_and_values_in_a_status(
    changes: dict[str, Any], errors: dict[str, Any], ascii_only: bool
) -> None:
    doc = {**VALID_STATUS, **changes}
    if errors:
        doc["read_errors"] = errors
    node = doc.get("node")
    keys = [STATUS_KEY] + ([f"status.{node}"] if isinstance(node, str) else [])
    body = _dump(doc, ascii_only=ascii_only)
    for key in keys:
        status = _attempt(decode_status, body, key)
        if status is not None:
            _check_safe_status(status, key)


@HOSTILE
@given(
    changes=st.dictionaries(
        st.sampled_from(LEGACY_FIELDS) | hostile_text, hostile_values, min_size=1, max_size=3
    ),
    key=st.sampled_from([READING_KEY, "readings", ""])
    | st.builds("sensors.{}.{}".format, hostile_text, hostile_text),
)
def test_hostile_legacy_messages(changes: dict[str, Any], key: str) -> None:
    doc = {**VALID_LEGACY, **changes}
    reading = _attempt(decode_reading, _dump(doc, ascii_only=False), key)
    if reading is not None:
        _check_safe_reading(reading, key)
        assert reading.kind == LEGACY_KIND


@HOSTILE
@given(
    which=st.sampled_from(sorted(FORMS)),
    data=st.data(),
    number=huge_integers,
)
def test_huge_integers_in_any_field(which: str, data: st.DataObject, number: int) -> None:
    doc, key, decoder = FORMS[which]
    field = data.draw(st.sampled_from(sorted(doc)), label="field")
    body = _dump({**doc, field: number}, ascii_only=True)
    decoded = _attempt(decoder, body, key)
    if isinstance(decoded, Reading):
        _check_safe_reading(decoded, key)
    elif isinstance(decoded, NodeStatus):
        _check_safe_status(decoded, key)


@HOSTILE
@given(
    which=st.sampled_from(sorted(FORMS)),
    data=st.data(),
    literal=number_literals,
)
def test_extreme_number_literals_in_any_field(
    which: str, data: st.DataObject, literal: str
) -> None:
    doc, key, decoder = FORMS[which]
    field = data.draw(st.sampled_from(sorted(doc)), label="field")
    decoded = _attempt(decoder, _with_raw(doc, field, literal), key)
    if isinstance(decoded, Reading):
        _check_safe_reading(decoded, key)
    elif isinstance(decoded, NodeStatus):
        _check_safe_status(decoded, key)


@HOSTILE
@given(
    which=st.sampled_from(sorted(FORMS)),
    data=st.data(),
    depth=st.integers(min_value=1, max_value=MAX_PAYLOAD_BYTES // 2),
    shape=st.sampled_from(["array", "object", "mixed"]),
)
def test_deep_nesting_under_valid_keys(
    which: str, data: st.DataObject, depth: int, shape: str
) -> None:
    doc, key, decoder = FORMS[which]
    field = data.draw(st.sampled_from(sorted(doc)), label="field")
    opening = {"array": "[", "object": '{"a":', "mixed": '[{"a":'}[shape]
    closing = {"array": "]", "object": "}", "mixed": "}]"}[shape]
    raw = opening * depth + "1" + closing * depth
    body = _with_raw(doc, field, raw)
    if which == "status" and field == "read_errors" and shape == "object" and depth == 1:
        # read_errors is the one field that is an object (sensor id -> count): {"a":1} is a
        # valid value, and it must decode.
        decoder(body, key, now=NOW)
        return
    # No other field takes a nested value, so whatever the depth (and the size), this is
    # rejected.
    try:
        decoder(body, key, now=NOW)
    except Rejected as exc:
        _check_reason(exc.reason)
    else:
        raise AssertionError(f"a value nested {depth} deep under {field!r} was accepted")


_BAD_TEXT = [
    "\\ud800",  # lone high surrogate, escaped: valid JSON, a str that is not UTF-8
    "\\udfff",
    "\\udc80\\ud800",  # a pair in the wrong order
    "\\ud83d\\ude00",  # a proper pair: one astral character, not an id character
    "\\u0000",
    "\\u202e",
]
_BAD_BYTES = [
    b"\xed\xa0\x80",  # a surrogate encoded as UTF-8 (CESU-8): invalid UTF-8
    b"\xc0\xaf",  # an overlong '/'
    b"\xff",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe2\x82",  # truncated sequence
]


@HOSTILE
@given(
    which=st.sampled_from(sorted(FORMS)),
    data=st.data(),
    escaped=st.lists(st.sampled_from(_BAD_TEXT), min_size=1, max_size=3),
    raw=st.lists(st.sampled_from(_BAD_BYTES), max_size=2),
    position=st.integers(min_value=0, max_value=8),
)
def test_surrogates_and_invalid_utf8_in_string_fields(
    which: str,
    data: st.DataObject,
    escaped: list[str],
    raw: list[bytes],
    position: int,
) -> None:
    doc, key, decoder = FORMS[which]
    strings = sorted(k for k, v in doc.items() if isinstance(v, str))
    field = data.draw(st.sampled_from(strings), label="field")
    original = str(doc[field])
    cut = min(position, len(original))
    inner = original[:cut] + "".join(escaped) + original[cut:]
    body = _with_raw(doc, field, '"' + inner + '"')
    if raw:  # raw invalid bytes inside the string value too
        body = body.replace(inner.encode(), inner.encode() + b"".join(raw), 1)
    decoded = _attempt(decoder, body, key)
    if decoded is None:
        return
    # Every injected sequence is outside the id alphabet, the kinds, the states and the time
    # formats; only agent_version is free text, and it may hold a printable astral character.
    assert isinstance(decoded, NodeStatus), f"accepted {body!r}"
    assert field == "agent_version", f"accepted {body!r}"
    assert not raw
    _check_safe_status(decoded, key)


def test_uptime_beyond_float_range_is_rejected() -> None:
    body = b'{"version":1,"node":"pi-01","state":"online","uptime_s":1' + b"0" * 400 + b"}"
    with pytest.raises(Rejected) as rejected:
        decode_status(body, STATUS_KEY, now=NOW)
    _check_reason(rejected.value.reason)


@HOSTILE
@given(
    day=st.one_of(
        # The first and the last day of the calendar, where an offset leaves the range...
        st.dates(max_value=date(1, 1, 1)),
        st.dates(min_value=date(9999, 12, 31)),
        # ... and any other.
        st.dates(),
    ),
    clock=st.times(),
    offset_minutes=st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
    # (date-time separator, offset separator)
    form=st.sampled_from([("T", ":"), ("T", ""), (" ", ":"), (" ", "")]),
    where=st.sampled_from(["legacy data", "v1 ts", "status ts"]),
)
def test_times_anywhere_in_the_calendar_with_any_offset(
    day: date, clock: time, offset_minutes: int, form: tuple[str, str], where: str
) -> None:
    """Near year 1 or 9999 an offset takes a time out of `datetime`'s range in UTC; that is a
    rejection with a reason like any other, never an OverflowError."""
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    separator, colon = form
    offset = f"{sign}{hours:02d}{colon}{minutes:02d}"
    text = f"{day.isoformat()}{separator}{clock.isoformat(timespec='seconds')}{offset}"
    if where == "legacy data":
        doc, field, key, decoder = VALID_LEGACY, "data", READING_KEY, decode_reading
    elif where == "v1 ts":
        doc, field, key, decoder = VALID_READING, "ts", READING_KEY, decode_reading
    else:
        doc, field, key, decoder = VALID_STATUS, "ts", STATUS_KEY, decode_status
    body = json.dumps({**doc, field: text}).encode()
    decoded = _attempt(decoder, body, key)
    if decoded is not None:
        assert decoded.ts is not None
        assert decoded.ts.utcoffset() is not None
        assert datetime(2000, 1, 1, tzinfo=UTC) <= decoded.ts <= NOW.replace(minute=5)
