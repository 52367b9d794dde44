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

from edge_agent.wire import reading_payload
from pipeline import decode
from pipeline.decode import (
    HUMIDITY_KINDS,
    KINDS,
    TEMPERATURE_RANGES,
    Reading,
    decode_reading,
    decode_reading_fast,
    decode_reading_full,
    encode_reading,
)
from pipeline.errors import Rejected

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
EXAMPLES = settings(max_examples=400, deadline=None)

pytestmark = pytest.mark.skipif(decode.msgspec is None, reason="msgspec is not installed")


@st.composite
def readings(draw: st.DrawFn) -> Reading:
    kind = draw(st.sampled_from(sorted(KINDS)))
    low, high = TEMPERATURE_RANGES[kind]
    humidity = None
    if kind in HUMIDITY_KINDS:
        humidity = draw(st.none() | st.floats(0, 100))
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
        temperature_c=draw(st.floats(low, high)),
        humidity_pct=humidity,
        time_uncertain=draw(st.booleans()),
    )


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
    return fast


@EXAMPLES
@given(readings())
def test_the_pipelines_encoding_takes_the_fast_path_with_the_full_decoders_result(
    reading: Reading,
) -> None:
    body = encode_reading(reading)
    fast = _agrees(body, _topic(reading))
    # Python writes floats below 1e-4 with an exponent ("1e-05"), msgspec a little differently
    # ("1e-5"): such a payload is not canonical and takes the full decoder, correctly but
    # slower. Agents round to 4 decimals, so theirs never do (next test).
    if "e" not in repr(reading.temperature_c) + repr(reading.humidity_pct):
        assert fast == reading
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
    doc = json.loads(encode_reading(reading))
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
    body = encode_reading(reading)
    assert decode_reading_fast(body, key, now=NOW) is None
    assert isinstance(_full(body, key), str)


@EXAMPLES
@given(st.binary(max_size=300), st.text(max_size=40))
def test_the_fast_path_never_raises_and_never_disagrees(body: bytes, key: str) -> None:
    _agrees(body, key)


def test_a_rejection_still_names_the_field_and_value() -> None:
    reading = Reading("pi-1", "t1", "ds18b20", 7, NOW, 20.5, None, False)
    body = encode_reading(reading).replace(b"20.5", b"200.5")
    with pytest.raises(Rejected, match=r"temperature_c: 200\.5 is outside"):
        decode_reading(body, _topic(reading), now=NOW)
