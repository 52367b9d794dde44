"""Properties of pipeline.decode, checked with hypothesis.

- No input makes a decoder raise anything but Rejected, and every reason is short, names a
  field before a colon, and is valid UTF-8 (it goes into a log line and an AMQP header).
- What the decoder accepts satisfies the contract, and also validates against the JSON Schema
  (the decoder is never more lenient than the published schema).
- Generated valid readings survive the contract's encoder (reading_payload) -> decode_reading
  unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.decode import (
    LEGACY_KIND,
    MAX_PAYLOAD_BYTES,
    NodeStatus,
    Reading,
    decode_reading,
    decode_status,
)
from pipeline.errors import Rejected
from tempmon_contract.kinds import HUMIDITY, KINDS, LEGACY, PRESSURE, TEMPERATURE
from tempmon_contract.wire import reading_payload

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "gateway" / "schema"
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_REASON = 400
FAST = settings(max_examples=300, deadline=None)


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


READING_SCHEMA = _validator("reading.v1.schema.json")
LEGACY_SCHEMA = _validator("legacy.schema.json")
STATUS_SCHEMA = _validator("status.v1.schema.json")

# --- strategies --------------------------------------------------------------------------------

ids = st.from_regex(ID, fullmatch=True)
times = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
    max_value=(NOW + timedelta(seconds=300)).replace(tzinfo=None),
    timezones=st.just(UTC),
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**63 + 1)
    | st.floats()  # NaN and infinities too: json.dumps writes them as non-standard tokens
    | st.text(st.characters(exclude_categories=()), max_size=70)  # lone surrogates included
    | ids
    | st.sampled_from(["2025-06-01T11:59:00Z", "2025-06-01 11:59:00", "ds18b20", "online", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
routing_keys = (
    st.just("sensors.pi-01.t1")
    | st.builds("sensors.{}.{}".format, ids, ids)
    | st.builds("status.{}".format, ids)
    | st.text(max_size=80)
)


def _wire_values(low: float, high: float, decimals: int) -> st.SearchStrategy[float]:
    """Values at the wire's decimals: the contract's encoder rounds to them."""
    return st.floats(min_value=low, max_value=high).map(lambda v: round(v, decimals))


def _optional(draw: st.DrawFn, kind: str, field: str, decimals: int) -> float | None:
    spec = KINDS[kind]
    if field not in spec.measures:
        return None
    low, high = spec.range_of(field)
    value: float | None = draw(st.none() | _wire_values(low, high, decimals))
    return value


def _spec(kind: str) -> Any:
    return LEGACY if kind == LEGACY_KIND else KINDS[kind]


@st.composite
def readings(draw: st.DrawFn) -> Reading:
    kind = draw(st.sampled_from(sorted(KINDS)))
    low, high = KINDS[kind].temperature
    humidity = _optional(draw, kind, HUMIDITY.field, HUMIDITY.decimals)
    pressure = _optional(draw, kind, PRESSURE.field, PRESSURE.decimals)
    return Reading(
        node=draw(ids),
        sensor=draw(ids),
        kind=kind,
        seq=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        ts=draw(times),
        temperature_c=draw(_wire_values(low, high, TEMPERATURE.decimals)),
        humidity_pct=humidity,
        time_uncertain=draw(st.booleans()),
        pressure_hpa=pressure,
    )


@st.composite
def legacy_payloads(draw: st.DrawFn) -> tuple[dict[str, Any], datetime]:
    ts = draw(times)
    offset = draw(st.integers(min_value=-12 * 60, max_value=14 * 60))
    local = ts + timedelta(minutes=offset)
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset), 60)
    layout = draw(st.sampled_from(["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f"]))
    suffix = draw(
        st.sampled_from(
            ["", "Z", f"{sign}{hours:02}:{minutes:02}", f"{sign}{hours:02}{minutes:02}"]
        )
    )
    if suffix in {"", "Z"}:
        local = ts
    text = local.replace(tzinfo=None).strftime(layout) + suffix
    if layout.endswith("%S"):
        ts = ts.replace(microsecond=0)
    raw_id = draw(ids | st.integers(min_value=-(10**20), max_value=10**20))
    temperature = draw(
        st.floats(min_value=-100, max_value=150) | st.integers(min_value=-100, max_value=150)
    )
    return {"id": raw_id, "data": text, "temperatura": temperature}, ts


@st.composite
def statuses(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    node = draw(ids)
    doc: dict[str, Any] = {
        "version": 1,
        "node": node,
        "state": draw(st.sampled_from(["online", "offline"])),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "ts": times.map(lambda t: t.isoformat().replace("+00:00", "Z")),
        "agent_version": st.text(
            st.characters(codec="utf-8", categories=["L", "N", "P"]), max_size=64
        ),
        "uptime_s": st.floats(min_value=0, max_value=1e9)
        | st.integers(min_value=0, max_value=10**9),
        "outbox_depth": st.integers(min_value=0, max_value=2**63 - 1),
        "dropped": st.integers(min_value=0, max_value=10**6),
        "read_errors": st.dictionaries(ids, st.integers(min_value=0, max_value=10**6), max_size=64),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            doc[key] = draw(strategy)
    return f"status.{node}", doc


def _v1_doc(reading: Reading) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_encode(reading))
    return doc


def _encode(reading: Reading) -> bytes:
    return reading_payload(**reading._asdict())


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """The document with a few keys removed, replaced or added."""
    doc = dict(doc)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        if action == "drop" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
        elif action == "replace" and doc:
            doc[draw(st.sampled_from(sorted(doc)))] = draw(json_values)
        else:
            known = [
                "version",
                "humidity_pct",
                "pressure_hpa",
                "time_uncertain",
                "temperatura",
                "id",
                "data",
                "ts",
            ]
            doc[draw(st.sampled_from(known) | st.text(max_size=10))] = draw(json_values)
    return doc


def _dump(value: object, *, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, a case worth sending.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# --- checks ------------------------------------------------------------------------------------


def _check_reason(reason: str) -> None:
    assert isinstance(reason, str)
    assert 0 < len(reason) <= MAX_REASON, reason
    assert ": " in reason, reason
    reason.encode("utf-8")
    assert "\n" not in reason


def _attempt(decoder: Callable[..., Reading | NodeStatus], body: bytes, key: str) -> Any:
    """The decoded value, or None when the input is rejected; anything else fails the test."""
    try:
        return decoder(body, key, now=NOW)
    except Rejected as exc:
        _check_reason(exc.reason)
        return None


def _check_reading(reading: Reading, key: str) -> None:
    assert ID.fullmatch(reading.node)
    assert ID.fullmatch(reading.sensor)
    assert reading.kind in {*KINDS, LEGACY_KIND}
    if reading.kind != LEGACY_KIND:
        assert key == f"sensors.{reading.node}.{reading.sensor}"
    assert 0 <= reading.seq <= 2**63 - 1
    assert reading.ts.utcoffset() == timedelta(0)
    assert datetime(2000, 1, 1, tzinfo=UTC) <= reading.ts <= NOW + timedelta(seconds=300)
    spec = _spec(reading.kind)
    low, high = spec.temperature
    assert type(reading.temperature_c) is float
    assert math.isfinite(reading.temperature_c)
    assert low <= reading.temperature_c <= high
    for field, value in (
        (HUMIDITY.field, reading.humidity_pct),
        (PRESSURE.field, reading.pressure_hpa),
    ):
        if value is not None:
            assert field in spec.measures
            assert type(value) is float
            assert spec.range_of(field)[0] <= value <= spec.range_of(field)[1]
    assert type(reading.time_uncertain) is bool


def _check_accepted_reading(doc: Any, reading: Reading, key: str) -> None:
    _check_reading(reading, key)
    schema = LEGACY_SCHEMA if reading.kind == LEGACY_KIND else READING_SCHEMA
    errors = [error.message for error in schema.iter_errors(doc)]
    assert not errors, f"the decoder accepted what the schema rejects: {errors}"


# --- properties --------------------------------------------------------------------------------


@FAST
@given(body=st.binary(max_size=MAX_PAYLOAD_BYTES + 16), key=routing_keys)
def test_arbitrary_bytes_are_only_ever_rejected(body: bytes, key: str) -> None:
    _attempt(decode_reading, body, key)
    _attempt(decode_status, body, key)


@FAST
@given(value=json_values, key=routing_keys, ascii_only=st.booleans())
def test_arbitrary_json_is_only_ever_rejected(value: Any, key: str, ascii_only: bool) -> None:
    body = _dump(value, ascii_only=ascii_only)
    reading = _attempt(decode_reading, body, key)
    if reading is not None:
        _check_accepted_reading(value, reading, key)
    _attempt(decode_status, body, key)


@FAST
@given(reading=readings())
def test_valid_readings_round_trip(reading: Reading) -> None:
    body = _encode(reading)
    assert len(body) <= MAX_PAYLOAD_BYTES
    assert not list(READING_SCHEMA.iter_errors(json.loads(body)))
    key = f"sensors.{reading.node}.{reading.sensor}"
    assert decode_reading(body, key, now=NOW) == reading


@FAST
@given(data=st.data(), reading=readings(), ascii_only=st.booleans())
def test_mutated_readings_are_rejected_or_valid(
    data: st.DataObject, reading: Reading, ascii_only: bool
) -> None:
    doc = data.draw(mutated(_v1_doc(reading)))
    key = data.draw(st.just(f"sensors.{reading.node}.{reading.sensor}") | routing_keys)
    decoded = _attempt(decode_reading, _dump(doc, ascii_only=ascii_only), key)
    if decoded is not None:
        _check_accepted_reading(doc, decoded, key)


@FAST
@given(data=st.data(), reading=readings())
def test_damaged_bytes_are_rejected_or_valid(data: st.DataObject, reading: Reading) -> None:
    body = bytearray(_encode(reading))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(body)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.integers(min_value=0, max_value=255))
        if action == "insert":
            body.insert(position, byte)
        elif position < len(body):
            if action == "set":
                body[position] = byte
            else:
                del body[position]
    key = f"sensors.{reading.node}.{reading.sensor}"
    decoded = _attempt(decode_reading, bytes(body), key)
    if decoded is not None:
        _check_reading(decoded, key)


@FAST
@given(case=legacy_payloads(), key=routing_keys)
def test_legacy_readings_decode(case: tuple[dict[str, Any], datetime], key: str) -> None:
    doc, ts = case
    decoded = decode_reading(_dump(doc, ascii_only=True), key, now=NOW)
    _check_accepted_reading(doc, decoded, key)
    assert decoded.ts == ts
    assert decoded.seq == (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert decoded.sensor == str(doc["id"])
    assert decoded.temperature_c == doc["temperatura"]


@FAST
@given(data=st.data(), case=legacy_payloads())
def test_mutated_legacy_readings_are_rejected_or_valid(
    data: st.DataObject, case: tuple[dict[str, Any], datetime]
) -> None:
    doc = data.draw(mutated(case[0]))
    decoded = _attempt(decode_reading, _dump(doc, ascii_only=True), "readings")
    if decoded is not None:
        _check_accepted_reading(doc, decoded, "readings")


@FAST
@given(case=statuses())
def test_valid_statuses_decode(case: tuple[str, dict[str, Any]]) -> None:
    key, doc = case
    assert not list(STATUS_SCHEMA.iter_errors(doc))
    status = decode_status(_dump(doc, ascii_only=False), key, now=NOW)
    assert status.node == doc["node"]
    assert status.state == doc["state"]
    assert status.read_errors == doc.get("read_errors")
    assert status.outbox_depth == doc.get("outbox_depth")


@FAST
@given(data=st.data(), case=statuses(), ascii_only=st.booleans())
def test_mutated_statuses_are_rejected_or_valid(
    data: st.DataObject, case: tuple[str, dict[str, Any]], ascii_only: bool
) -> None:
    key, doc = case
    doc = data.draw(mutated(doc))
    status = _attempt(decode_status, _dump(doc, ascii_only=ascii_only), key)
    if status is not None:
        errors = [error.message for error in STATUS_SCHEMA.iter_errors(doc)]
        assert not errors, f"the decoder accepted what the schema rejects: {errors}"
        assert key == f"status.{status.node}"
