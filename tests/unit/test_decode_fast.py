"""The decoder's fast path (msgspec) is held to the full decoder.

`decode_reading` first tries `decode_reading_fast`, which takes only payloads in the agents'
own canonical form and leaves everything else (returns None) to `decode_reading_full`. The
properties here: whatever the fast path returns, the full decoder returns too, for any payload
and routing key; it never takes a payload the full decoder rejects; it never raises; and the
payloads our own encoders write do take it (otherwise it would be correct but useless).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.decode import (
    Reading,
    decode_reading,
    decode_reading_fast,
    decode_reading_full,
)
from pipeline.decode import fast as fast_path
from pipeline.errors import Rejected
from tempmon_contract.kinds import HUMIDITY, KINDS, PRESSURE, TEMPERATURE
from tempmon_contract.wire import reading_payload

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
EXAMPLES = settings(max_examples=400, deadline=None)

pytestmark = pytest.mark.skipif(fast_path.msgspec is None, reason="msgspec is not installed")


def _at_wire_decimals(low: float, high: float, decimals: int) -> st.SearchStrategy[float]:
    """Values the contract's encoder writes unchanged (it rounds to the quantity's decimals)."""
    return st.floats(low, high).map(lambda v: round(v, decimals))


@st.composite
def readings(draw: st.DrawFn) -> Reading:
    kind = draw(st.sampled_from(sorted(KINDS)))
    spec = KINDS[kind]
    low, high = spec.temperature
    humidity = pressure = None
    if HUMIDITY.field in spec.measures:
        h_low, h_high = spec.range_of(HUMIDITY.field)
        humidity = draw(st.none() | _at_wire_decimals(h_low, h_high, HUMIDITY.decimals))
    if PRESSURE.field in spec.measures:
        p_low, p_high = spec.range_of(PRESSURE.field)
        pressure = draw(st.none() | _at_wire_decimals(p_low, p_high, PRESSURE.decimals))
    ts = draw(
        st.datetimes(
            min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
            max_value=(NOW + timedelta(seconds=299)).replace(tzinfo=None),
            timezones=st.just(UTC),
        )
    )
    return Reading(
        node=draw(st.from_regex(ID, fullmatch=True)),
        sensor=draw(st.from_regex(ID, fullmatch=True)),
        kind=kind,
        seq=draw(st.integers(0, 2**63 - 1)),
        ts=ts,
        temperature_c=draw(_at_wire_decimals(low, high, TEMPERATURE.decimals)),
        humidity_pct=humidity,
        time_uncertain=draw(st.booleans()),
        pressure_hpa=pressure,
    )


def encode(reading: Reading) -> bytes:
    """The contract's payload of a reading, ``ts`` as an aware datetime (to the microsecond)."""
    return reading_payload(**reading._asdict())


def _topic(r: Reading) -> str:
    return f"sensors.{r.node}.{r.sensor}"


def _full(body: bytes, routing_key: str) -> Reading | str:
    try:
        return decode_reading_full(body, routing_key, now=NOW)
    except Rejected as exc:
        return f"rejected: {exc.reason}"


def _agrees(body: bytes, routing_key: str) -> Reading | None:
    """The fast path's answer, after checking it against the full decoder's."""
    fast = decode_reading_fast(body, routing_key, now=NOW)
    if fast is not None:
        assert fast == _full(body, routing_key), body
        assert type(fast.temperature_c) is float
        assert fast.humidity_pct is None or type(fast.humidity_pct) is float
        assert fast.pressure_hpa is None or type(fast.pressure_hpa) is float
    return fast


@EXAMPLES
@given(readings())
def test_the_contracts_encoding_takes_the_fast_path_with_the_full_decoders_result(
    reading: Reading,
) -> None:
    body = encode(reading)
    # Python writes floats below 1e-4 with an exponent ("1e-05"), msgspec a little differently
    # ("1e-5"): such a payload would not be canonical. The encoder rounds every value to at
    # most 4 decimals, so it never writes one, and every payload takes the fast path.
    assert _agrees(body, _topic(reading)) == reading
    assert decode_reading(body, _topic(reading), now=NOW) == reading


@EXAMPLES
@given(readings())
def test_the_agents_payloads_take_the_fast_path(reading: Reading) -> None:
    body = reading_payload(
        node=reading.node,
        sensor=reading.sensor,
        kind=reading.kind,
        seq=reading.seq,
        ts=reading.ts.timestamp(),
        temperature_c=reading.temperature_c,
        humidity_pct=reading.humidity_pct,
        pressure_hpa=reading.pressure_hpa,
        time_uncertain=reading.time_uncertain,
    )
    assert _agrees(body, _topic(reading)) is not None, body


def _duplicate_node(doc: dict[str, Any]) -> bytes:
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace('"node":', '"node":"other","node":', 1).encode()


# Each turns a canonical payload into one the fast path must leave to the full decoder, or
# answer exactly as the full decoder does.
MUTATIONS: dict[str, Any] = {
    "duplicate key": _duplicate_node,
    "spaces": lambda d: json.dumps(d).encode(),
    "fields reordered": lambda d: json.dumps(dict(reversed(d.items()))).encode(),
    "+00:00 offset": lambda d: _dumps({**d, "ts": d["ts"].replace("Z", "+00:00")}),
    "+01:00 offset": lambda d: _dumps({**d, "ts": d["ts"].replace("Z", "+01:00")}),
    "no offset": lambda d: _dumps({**d, "ts": d["ts"].removesuffix("Z")}),
    "space for T": lambda d: _dumps({**d, "ts": d["ts"].replace("T", " ")}),
    "lowercase t": lambda d: _dumps({**d, "ts": d["ts"].replace("T", "t")}),
    "leap second": lambda d: _dumps({**d, "ts": d["ts"][:17] + "60Z"}),
    "in the future": lambda d: _dumps({**d, "ts": "2025-06-01T12:05:01Z"}),
    "before 2000": lambda d: _dumps({**d, "ts": "1999-12-31T23:59:59Z"}),
    "integer temperature": lambda d: _dumps({**d, "temperature_c": 20}),
    "too hot": lambda d: _dumps({**d, "temperature_c": 1000.0}),
    "1e400": lambda d: _dumps(d).replace(b'"temperature_c":', b'"temperature_c":1e400,"x":'),
    "NaN": lambda d: _dumps(d).replace(b'"temperature_c":', b'"temperature_c":NaN,"x":'),
    "explicit null humidity": lambda d: _dumps({**d, "humidity_pct": None}),
    "explicit false": lambda d: _dumps({**d, "time_uncertain": False}),
    "humidity on any kind": lambda d: _dumps({**d, "humidity_pct": 50.0}),
    "humidity 101": lambda d: _dumps({**d, "humidity_pct": 101.0}),
    "explicit null pressure": lambda d: _dumps({**d, "pressure_hpa": None}),
    "pressure on any kind": lambda d: _dumps({**d, "pressure_hpa": 1013.25}),
    "pressure 299.9": lambda d: _dumps({**d, "pressure_hpa": 299.9}),
    "pressure 1100.1": lambda d: _dumps({**d, "pressure_hpa": 1100.1}),
    "integer pressure": lambda d: _dumps({**d, "pressure_hpa": 1013}),
    "string pressure": lambda d: _dumps({**d, "pressure_hpa": "1013.0"}),
    "pressure before humidity": lambda d: _dumps(
        {**{k: v for k, v in d.items() if k != "humidity_pct"}, "pressure_hpa": 1000.5}
        | ({"humidity_pct": d["humidity_pct"]} if "humidity_pct" in d else {"humidity_pct": 1.5})
    ),
    "unknown field": lambda d: _dumps({**d, "extra": 1}),
    "unknown kind": lambda d: _dumps({**d, "kind": "toaster"}),
    "legacy kind": lambda d: _dumps({**d, "kind": "legacy"}),
    "version 2": lambda d: _dumps({**d, "version": 2}),
    "version true": lambda d: _dumps({**d, "version": True}),
    "negative seq": lambda d: _dumps({**d, "seq": -1}),
    "seq past bigint": lambda d: _dumps({**d, "seq": 2**63}),
    "seq past uint64": lambda d: _dumps({**d, "seq": 2**70}),
    "float seq": lambda d: _dumps({**d, "seq": 1.0}),
    "escaped node": lambda d: _dumps(d).replace(b'"node":"', b'"node":"\\u0041', 1),
    "non-ASCII node": lambda d: _dumps({**d, "node": "n\u00f3"}),
    "missing sensor": lambda d: _dumps({k: v for k, v in d.items() if k != "sensor"}),
    "another node": lambda d: _dumps({**d, "node": "other"}),
    "string temperature": lambda d: _dumps({**d, "temperature_c": "20.5"}),
    "array": lambda d: b"[" + _dumps(d) + b"]",
    "trailing garbage": lambda d: _dumps(d) + b"x",
    "trailing newline": lambda d: _dumps(d) + b"\n",
    "oversize": lambda d: _dumps({**d, "node": "n" * 5000}),
    "invalid UTF-8": lambda d: _dumps(d).replace(b'"sensor":"', b'"sensor":"\xff', 1),
}


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@EXAMPLES
@given(readings(), st.sampled_from(sorted(MUTATIONS)))
def test_a_payload_off_the_canonical_form_gets_the_full_decoders_answer(
    reading: Reading, mutation: str
) -> None:
    doc = json.loads(encode(reading))
    body = MUTATIONS[mutation](doc)
    fast = _agrees(body, _topic(reading))
    full = _full(body, _topic(reading))
    if isinstance(full, str):
        assert fast is None, (mutation, body, full)
    try:
        combined: Reading | str = decode_reading(body, _topic(reading), now=NOW)
    except Rejected as exc:
        combined = f"rejected: {exc.reason}"
    assert combined == full, mutation


@EXAMPLES
@given(readings(), st.sampled_from(["sensors.a", "sensors.a.b.c", "status.a", "", "sensors..b"]))
def test_a_wrong_routing_key_is_left_to_the_full_decoder(reading: Reading, key: str) -> None:
    body = encode(reading)
    assert decode_reading_fast(body, key, now=NOW) is None
    assert isinstance(_full(body, key), str)


@EXAMPLES
@given(st.binary(max_size=300), st.text(max_size=40))
def test_the_fast_path_never_raises_and_never_disagrees(body: bytes, key: str) -> None:
    _agrees(body, key)


def test_a_rejection_still_names_the_field_and_value() -> None:
    reading = Reading("pi-1", "t1", "ds18b20", 7, NOW, 20.5, None, False)
    body = encode(reading).replace(b"20.5", b"200.5")
    with pytest.raises(Rejected, match=r"temperature_c: 200\.5 is outside"):
        decode_reading(body, _topic(reading), now=NOW)


@pytest.mark.parametrize(
    ("kind", "humidity", "pressure", "reason"),
    [
        ("bme280", None, 1100.5, "pressure_hpa: 1100.5 is outside 300..1100"),
        ("bme280", 100.5, 1000.0, "humidity_pct: 100.5 is outside 0..100"),
        ("dht22", None, 1013.25, "pressure_hpa: 1013.25 given for a dht22"),
        ("cpu", 50.0, None, "humidity_pct: 50.0 given for a cpu"),
    ],
)
def test_a_canonical_payload_with_a_bad_measure_is_left_to_the_full_decoder(
    kind: str, humidity: float | None, pressure: float | None, reason: str
) -> None:
    """Canonical in form, so only the fast path's own range and kind checks stop it."""
    doc: dict[str, Any] = json.loads(encode(Reading("pi-1", "t1", kind, 7, NOW, 20.5, None, False)))
    if humidity is not None:
        doc["humidity_pct"] = humidity
    if pressure is not None:
        doc["pressure_hpa"] = pressure
    body = _dumps(doc)
    assert decode_reading_fast(body, "sensors.pi-1.t1", now=NOW) is None
    with pytest.raises(Rejected) as caught:
        decode_reading(body, "sensors.pi-1.t1", now=NOW)
    assert caught.value.reason.startswith(reason), caught.value.reason
