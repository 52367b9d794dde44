"""pipeline.decode: tables for the decoders, and the contract's encoder read back by them.

The per-field rules are covered case by case by gateway/schema/examples (test_schema_examples);
these tables pin exact reasons, the mapping of the legacy form, and that what
``tempmon_contract.wire.reading_payload`` writes decodes to the same reading.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from pipeline.decode import (
    LEGACY_KIND,
    LEGACY_NODE,
    MAX_PAYLOAD_BYTES,
    NodeStatus,
    Reading,
    decode_reading,
    decode_status,
)
from pipeline.errors import Rejected
from tempmon_contract.kinds import KINDS
from tempmon_contract.wire import reading_payload

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY = "sensors.pi-01.t1"


def payload(**changes: Any) -> bytes:
    """A valid ds18b20 reading for KEY, with fields changed (None removes one)."""
    doc: dict[str, Any] = {
        "version": 1,
        "node": "pi-01",
        "sensor": "t1",
        "kind": "ds18b20",
        "seq": 7,
        "ts": "2025-06-01T11:59:00.250Z",
        "temperature_c": 21.5,
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def reading(**changes: Any) -> Reading:
    base = Reading(
        node="pi-01",
        sensor="t1",
        kind="ds18b20",
        seq=7,
        ts=datetime(2025, 6, 1, 11, 59, 0, 250000, tzinfo=UTC),
        temperature_c=21.5,
        humidity_pct=None,
        time_uncertain=False,
    )
    return base._replace(**changes)


def encode(value: Reading) -> bytes:
    """The contract's v1 payload of a reading (its fields are the encoder's arguments)."""
    return reading_payload(**value._asdict())


def reason_of(body: bytes, routing_key: str = KEY, *, status: bool = False) -> str:
    decoder = decode_status if status else decode_reading
    with pytest.raises(Rejected) as caught:
        decoder(body, routing_key, now=NOW)
    return caught.value.reason


def test_constants() -> None:
    assert MAX_PAYLOAD_BYTES == 4096
    assert {"ds18b20", "dht22", "cpu", "simulated", "bme280"} <= set(KINDS)
    assert LEGACY_KIND not in KINDS


def test_reading_gained_pressure_last_with_a_default() -> None:
    """Code that builds a Reading positionally (the store's tests, benches) keeps working."""
    assert Reading._fields[-1] == "pressure_hpa"
    assert reading().pressure_hpa is None
    built = Reading("pi-01", "t1", "ds18b20", 7, NOW, 21.5, None, False)
    assert built.pressure_hpa is None


# --- exact reasons -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "routing_key", "reason"),
    [
        (
            payload(temperature_c=130.5),
            KEY,
            "temperature_c: 130.5 is outside what a ds18b20 can measure (-55..125)",
        ),
        (b" " * 5000, KEY, "payload: 5000 bytes exceeds the 4096-byte limit"),
        (b"", KEY, "payload: not UTF-8 JSON (Expecting value at line 1 column 1)"),
        (b"[1]", KEY, "payload: JSON array, expected an object"),
        (b"21.5", KEY, "payload: JSON number, expected an object"),
        (b"null", KEY, "payload: JSON null, expected an object"),
        (payload(seq=None), KEY, "seq: missing"),
        (payload(seq=True), KEY, "seq: True is a boolean, expected an integer"),
        (payload(seq=3.0), KEY, "seq: 3.0 is a float, expected an integer"),
        (
            payload(ts="2031-01-01T00:00:00Z"),
            KEY,
            "ts: '2031-01-01T00:00:00Z' is 176212800 s in the future (clock wrong?)",
        ),
        (payload(), "foo.bar", "routing key: 'foo.bar' is not sensors.<node>.<sensor>"),
        (
            payload(),
            "sensors.pi 01.t1",
            "routing key: 'sensors.pi 01.t1' is not sensors.<node>.<sensor>",
        ),
        (payload(node="pi-02"), KEY, "node: 'pi-02' does not match the topic's node 'pi-01'"),
        (payload(sensor="t2"), KEY, "sensor: 't2' does not match the topic's sensor 't1'"),
        (payload(version=2), KEY, "version: 2 is not supported (this pipeline reads version 1)"),
        (
            payload(ts="2025-06-01T12:00:00+01:00"),
            KEY,
            "ts: '2025-06-01T12:00:00+01:00' must be UTC (end in Z or +00:00)",
        ),
        (
            payload(kind="dht22", temperature_c=-41),
            KEY,
            "temperature_c: -41 is outside what a dht22 can measure (-40..80)",
        ),
        (payload(humidity_pct=101, kind="dht22"), KEY, "humidity_pct: 101 is outside 0..100"),
        (
            payload(humidity_pct=40.0),
            KEY,
            (
                "humidity_pct: 40.0 given for a ds18b20, which measures no relative humidity"
                " (only dht22, simulated and bme280 do)"
            ),
        ),
        (
            payload(kind="dht22", pressure_hpa=1013.2),
            KEY,
            (
                "pressure_hpa: 1013.2 given for a dht22, which measures no air pressure"
                " (only bme280 does)"
            ),
        ),
        (
            payload(kind="bme280", pressure_hpa=200),
            KEY,
            "pressure_hpa: 200 is outside 300..1100",
        ),
        (
            payload(kind="bme280", pressure_hpa=1100.5),
            KEY,
            "pressure_hpa: 1100.5 is outside 300..1100",
        ),
        (
            payload(kind="bme280", pressure_hpa="1013"),
            KEY,
            "pressure_hpa: '1013' is a string, expected a number",
        ),
        (
            payload(kind="bme280", temperature_c=85.5),
            KEY,
            "temperature_c: 85.5 is outside what a bme280 can measure (-40..85)",
        ),
        (
            payload(kind="simulated", temperature_c=150.5),
            KEY,
            "temperature_c: 150.5 is outside what a simulated sensor may report (-100..150)",
        ),
        (
            b'{"id": "t1", "data": "2025-06-01 11:59:00", "temperatura": 151}',
            KEY,
            "temperatura: 151 is outside what the legacy form allows (-100..150)",
        ),
        (
            payload(kind="toaster"),
            KEY,
            "kind: 'toaster' is not one of bme280, cpu, dht22, ds18b20, simulated",
        ),
        (b'{"version":1,"version":1}', KEY, "payload: key 'version' appears more than once"),
        (b"[" * 3000, KEY, "payload: JSON nested too deeply"),
        (
            b"\xc3\x28",
            KEY,
            "payload: not UTF-8 JSON (invalid UTF-8 at byte 0: invalid continuation byte)",
        ),
        (
            b'{"temperatura": 20, "id": 1}',
            KEY,
            "data: missing",
        ),
        (
            b'{"a": 1}',
            KEY,
            (
                "payload: keys ['a'] are neither a v1 reading (version, node, sensor, kind, seq,"
                " ts, temperature_c) nor the legacy form (id, data, temperatura)"
            ),
        ),
    ],
)
def test_reading_reasons(body: bytes, routing_key: str, reason: str) -> None:
    assert reason_of(body, routing_key) == reason


def test_size_is_checked_before_parsing() -> None:
    # Not JSON at all, but too big: the size is the reason.
    assert reason_of(b"\xff" * (MAX_PAYLOAD_BYTES + 1)).startswith("payload: 4097 bytes")


def test_exactly_max_payload_bytes_is_accepted() -> None:
    body = payload()
    body += b" " * (MAX_PAYLOAD_BYTES - len(body))
    assert decode_reading(body, KEY, now=NOW) == reading()


@pytest.mark.parametrize(
    "body",
    [
        payload(sensor="x" * 10_000),
        payload(**{"y" * 2000: 1}),
        payload(node=["a" * 100] * 10),
        b'{"version":' + b"[" * 900 + b"]" * 900 + b"}",
        b'{"a' + b"\\u00e9" * 600 + b'":1}',
    ],
    ids=["long id", "long key", "list id", "deep value", "escaped key"],
)
def test_reasons_stay_short(body: bytes) -> None:
    assert len(reason_of(body)) < 300


def test_reason_escapes_control_characters() -> None:
    reason = reason_of(payload(sensor="a\nb\x00\u2028"))
    assert "\n" not in reason
    assert "\x00" not in reason
    assert "\\n" in reason


def test_lone_surrogate_reason_is_encodable() -> None:
    reason = reason_of(b'{"version":1,"node":"\\ud800"}', "sensors.x.y")
    reason.encode("utf-8")  # would raise if the surrogate were copied verbatim


# --- v1 readings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (payload(), reading()),
        (payload(temperature_c=-55), reading(temperature_c=-55.0)),
        (
            payload(kind="dht22", humidity_pct=55),
            reading(kind="dht22", humidity_pct=55.0),
        ),
        (payload(kind="simulated", humidity_pct=0.5), reading(kind="simulated", humidity_pct=0.5)),
        (
            payload(kind="bme280", humidity_pct=45.125, pressure_hpa=1013.25),
            reading(kind="bme280", humidity_pct=45.125, pressure_hpa=1013.25),
        ),
        (
            payload(kind="bme280", pressure_hpa=300),
            reading(kind="bme280", pressure_hpa=300.0),
        ),
        (
            payload(kind="bme280", pressure_hpa=None, humidity_pct=None),
            reading(kind="bme280"),
        ),
        (
            (
                b'{"version":1,"node":"pi-01","sensor":"t1","kind":"cpu","seq":7,'
                b'"ts":"2025-06-01T11:59:00.250+00:00","temperature_c":21.5,"humidity_pct":null}'
            ),
            reading(kind="cpu"),
        ),
        (payload(time_uncertain=True), reading(time_uncertain=True)),
        (payload(time_uncertain=False), reading()),
        (
            payload(ts="2025-06-01T11:59:00.2509999Z"),
            reading(ts=datetime(2025, 6, 1, 11, 59, 0, 250999, tzinfo=UTC)),
        ),
        (payload(ts="2025-06-01T12:05:00Z"), reading(ts=NOW + timedelta(seconds=300))),
        (payload(seq=2**63 - 1), reading(seq=2**63 - 1)),
    ],
)
def test_decode_v1(body: bytes, expected: Reading) -> None:
    decoded = decode_reading(body, KEY, now=NOW)
    assert decoded == expected
    assert type(decoded.temperature_c) is float
    assert decoded.ts.utcoffset() == timedelta(0)


def test_naive_now_is_a_caller_bug() -> None:
    with pytest.raises(TypeError):
        decode_reading(payload(), KEY, now=datetime(2025, 6, 1, 12, 0))  # noqa: DTZ001


def test_reading_is_immutable() -> None:
    with pytest.raises(AttributeError):
        reading().seq = 8  # type: ignore[misc]


# --- legacy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "routing_key", "node", "sensor", "ts"),
    [
        (
            b'{"id": 1, "data": "2025-06-01 11:59:00", "temperatura": 21.5}',
            "readings",
            LEGACY_NODE,
            "1",
            datetime(2025, 6, 1, 11, 59, tzinfo=UTC),
        ),
        (
            b'{"id": "sala-1", "data": "2025-06-01T08:59:00.5-03:00", "temperatura": 21.5}',
            "sensors.pi-lab.sala-1",
            "pi-lab",
            "sala-1",
            datetime(2025, 6, 1, 11, 59, 0, 500000, tzinfo=UTC),
        ),
        (
            b'{"temperatura": 21.5, "data": "2025-06-01T11:59:00Z", "id": "x"}',
            "sensors.pi-lab",
            LEGACY_NODE,
            "x",
            datetime(2025, 6, 1, 11, 59, tzinfo=UTC),
        ),
        (
            b'{"id": 0, "data": "2025-06-01T12:59:00+0100", "temperatura": 21.5}',
            "sensors.a.b.c",
            LEGACY_NODE,
            "0",
            datetime(2025, 6, 1, 11, 59, tzinfo=UTC),
        ),
    ],
)
def test_decode_legacy(body: bytes, routing_key: str, node: str, sensor: str, ts: datetime) -> None:
    decoded = decode_reading(body, routing_key, now=NOW)
    millis = int(ts.timestamp() * 1000)
    assert decoded == Reading(node, sensor, LEGACY_KIND, millis, ts, 21.5, None, False)


def test_legacy_readings_in_one_millisecond_share_a_seq() -> None:
    first = decode_reading(
        b'{"id": 1, "data": "2025-06-01T11:59:00.250100", "temperatura": 20}', "q", now=NOW
    )
    second = decode_reading(
        b'{"id": 1, "data": "2025-06-01T11:59:00.250900", "temperatura": 21}', "q", now=NOW
    )
    assert first.seq == second.seq == 1748779140250


# --- status ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"version":1,"node":"pi-01","state":"offline"}',
            NodeStatus("pi-01", "offline", None, None, None, None, None, None),
        ),
        (
            (
                b'{"version":1,"node":"pi-01","state":"online","ts":"2025-06-01T11:59:00Z",'
                b'"agent_version":"0.1.0","uptime_s":5,"outbox_depth":3,"dropped":0,'
                b'"read_errors":{"t1":2}}'
            ),
            NodeStatus(
                "pi-01",
                "online",
                datetime(2025, 6, 1, 11, 59, tzinfo=UTC),
                "0.1.0",
                5.0,
                3,
                0,
                {"t1": 2},
            ),
        ),
        (
            b'{"version":1,"node":"pi-01","state":"offline","session":"00ff00ff00ff00ff"}',
            NodeStatus("pi-01", "offline", None, None, None, None, None, None, "00ff00ff00ff00ff"),
        ),
    ],
)
def test_decode_status(body: bytes, expected: NodeStatus) -> None:
    assert decode_status(body, "status.pi-01", now=NOW) == expected


@pytest.mark.parametrize(
    ("body", "routing_key", "reason"),
    [
        (
            b'{"version":1,"node":"pi-01","state":"up"}',
            "status.pi-01",
            "state: 'up' is not 'online' or 'offline'",
        ),
        (
            b'{"version":1,"node":"pi-01","state":"online"}',
            "status.pi-01.x",
            "routing key: 'status.pi-01.x' is not status.<node>",
        ),
        (
            b'{"version":1,"node":"pi-02","state":"online"}',
            "status.pi-01",
            "node: 'pi-02' does not match the topic's node 'pi-01'",
        ),
        (
            b'{"version":1,"node":"pi-01","state":"online","uptime_s":1e400}',
            "status.pi-01",
            "uptime_s: inf is not a number of seconds >= 0",
        ),
        (
            b'{"version":1,"node":"pi-01","state":"online","agent_version":"\\ud800"}',
            "status.pi-01",
            "agent_version: '\\ud800' contains unprintable characters",
        ),
        (b'{"node":"pi-01","state":"online"}', "status.pi-01", "version: missing"),
        (
            b'{"version":1,"node":"pi-01","state":"online","session":"00FF00FF00FF00FF"}',
            "status.pi-01",
            "session: '00FF00FF00FF00FF' is not 16 lowercase hex digits (the connection's id)",
        ),
        (
            # the decoder uses fullmatch: a `$`-anchored re.search lets a trailing newline through
            b'{"version":1,"node":"pi-01","state":"online","session":"00ff00ff00ff00ff\\n"}',
            "status.pi-01",
            "session: '00ff00ff00ff00ff\\n' is not 16 lowercase hex digits (the connection's id)",
        ),
        (
            b'{"version":1,"node":"pi-01","state":"online","session":12}',
            "status.pi-01",
            "session: 12 is an integer, expected 16 lowercase hex digits",
        ),
        (
            b'{"version":1,"node":"pi-01","state":"offline","session":null}',
            "status.pi-01",
            "session: null, expected 16 lowercase hex digits",
        ),
    ],
)
def test_status_reasons(body: bytes, routing_key: str, reason: str) -> None:
    assert reason_of(body, routing_key, status=True) == reason


# --- the contract's encoder, read back ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (
            reading(),
            (
                b'{"version":1,"node":"pi-01","sensor":"t1","kind":"ds18b20","seq":7,'
                b'"ts":"2025-06-01T11:59:00.250Z","temperature_c":21.5}'
            ),
        ),
        (
            reading(
                kind="dht22",
                humidity_pct=40.0,
                time_uncertain=True,
                ts=datetime(2025, 6, 1, 11, 59, 0, 1, tzinfo=UTC),
            ),
            (
                b'{"version":1,"node":"pi-01","sensor":"t1","kind":"dht22","seq":7,'
                b'"ts":"2025-06-01T11:59:00.000001Z","temperature_c":21.5,"humidity_pct":40.0,'
                b'"time_uncertain":true}'
            ),
        ),
        (
            reading(ts=datetime(2025, 6, 1, 14, 59, tzinfo=timezone(timedelta(hours=3)))),
            (
                b'{"version":1,"node":"pi-01","sensor":"t1","kind":"ds18b20","seq":7,'
                b'"ts":"2025-06-01T11:59:00.000Z","temperature_c":21.5}'
            ),
        ),
        (
            reading(kind="bme280", humidity_pct=45.5, pressure_hpa=1013.25),
            (
                b'{"version":1,"node":"pi-01","sensor":"t1","kind":"bme280","seq":7,'
                b'"ts":"2025-06-01T11:59:00.250Z","temperature_c":21.5,"humidity_pct":45.5,'
                b'"pressure_hpa":1013.25}'
            ),
        ),
    ],
    ids=["minimal", "all fields, microseconds", "converted to UTC", "bme280 with pressure"],
)
def test_encode_reading(value: Reading, encoded: bytes) -> None:
    assert encode(value) == encoded
    assert decode_reading(encoded, KEY, now=NOW) == value


@pytest.mark.parametrize(
    "value",
    [
        reading(),
        reading(kind="cpu", temperature_c=-40.0),
        reading(kind="simulated", temperature_c=149.9999, humidity_pct=0.0),
        reading(kind="dht22", temperature_c=round(0.1 + 0.2, 4), humidity_pct=100.0),
        reading(kind="bme280", temperature_c=-40.0, humidity_pct=0.001, pressure_hpa=1100.0),
        reading(kind="bme280", temperature_c=85.0, pressure_hpa=300.001),
        reading(seq=0, ts=datetime(2000, 1, 1, tzinfo=UTC)),
        reading(node="N" * 64, sensor="-_-", seq=2**63 - 1),
        reading(temperature_c=-0.0, time_uncertain=True),
    ],
)
def test_encode_decode_round_trip(value: Reading) -> None:
    key = f"sensors.{value.node}.{value.sensor}"
    assert decode_reading(encode(value), key, now=NOW) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (reading(kind=LEGACY_KIND), "kind: 'legacy' is not one of"),
        (reading(ts=datetime(2025, 6, 1)), "naive"),  # noqa: DTZ001
        (reading(temperature_c=float("nan")), "temperature_c: nan is not a finite number"),
        (reading(pressure_hpa=1013.0), "pressure_hpa: 1013.0 given for a ds18b20"),
    ],
)
def test_encode_reading_refuses(value: Reading, message: str) -> None:
    """The contract's encoder refuses what has no v1 form (a legacy reading included)."""
    with pytest.raises(ValueError, match=message):
        encode(value)


# Times at the ends of `datetime`: with an offset, converting them to UTC leaves its range
# (OverflowError). Every path that reads a time must reject them with a reason naming the
# field and the value, not fail (a decoder failure is dead-lettered with a traceback per message).
_EXTREME_TIMES = [
    "9999-12-31 23:59:59-23:59",
    "9999-12-31T23:59:59-2359",
    "9999-12-31 23:59:59.999999-00:01",
    "9999-12-31 23:59:59+23:59",
    "0001-01-01 00:00:00+23:59",
    "0001-01-01T00:00:00+0001",
    "0001-01-01 00:00:00-23:59",
    "9999-12-31 23:59:59",
    "0001-01-01 00:00:00",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00+00:00",
]


@pytest.mark.parametrize("text", _EXTREME_TIMES)
def test_legacy_time_at_the_ends_of_the_calendar_is_a_clean_rejection(text: str) -> None:
    body = json.dumps({"id": "s", "data": text, "temperatura": 20}).encode()
    with pytest.raises(Rejected) as rejected:
        decode_reading(body, KEY, now=NOW)
    assert rejected.value.reason.startswith(f"data: {text!r} is ")


@pytest.mark.parametrize("text", [t.replace(" ", "T") for t in _EXTREME_TIMES])
def test_v1_and_status_times_at_the_ends_of_the_calendar_are_clean_rejections(text: str) -> None:
    status = json.dumps({"version": 1, "node": "pi-01", "state": "online", "ts": text}).encode()
    for decode, body, key in (
        (decode_reading, payload(ts=text), KEY),
        (decode_status, status, "status.pi-01"),
    ):
        with pytest.raises(Rejected) as rejected:
            decode(body, key, now=NOW)
        assert rejected.value.reason.startswith(f"ts: {text!r} ")


def test_legacy_time_with_an_offset_is_stored_in_utc() -> None:
    body = json.dumps({"id": "s", "data": "2025-06-01 13:30:00+02:00", "temperatura": 20})
    decoded = decode_reading(body.encode(), KEY, now=NOW)
    assert decoded.ts == datetime(2025, 6, 1, 11, 30, tzinfo=UTC)
    assert decoded.ts.utcoffset() == timedelta(0)
