"""Both sides of the wire held to the contract: what the agent writes, the schema and the
pipeline's decoder accept, to the same values."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from pipeline.decode import decode_reading, decode_status
from pipeline.errors import Rejected
from tempmon_contract.wire import reading_payload, status_payload, utc_iso
from tests.harness.procs import REPO

SCHEMAS = REPO / "gateway" / "schema"


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


@pytest.mark.parametrize(
    ("kind", "humidity", "pressure", "uncertain"),
    [
        ("ds18b20", None, None, False),
        ("dht22", 55.25, None, False),
        ("cpu", None, None, True),
        ("simulated", 40.0, None, False),
        ("bme280", 48.125, 1013.257, False),
        ("bme280", None, 300.0, True),
        ("bme280", 100.0, 1100.0, False),
        ("bme280", None, None, False),
    ],
)
def test_agent_readings_satisfy_schema_and_decoder(
    kind: str, humidity: float | None, pressure: float | None, uncertain: bool
) -> None:
    ts = time.time() - 5
    body = reading_payload(
        node="pi-a",
        sensor="s-1",
        kind=kind,
        seq=1_764_000_000_000_123,
        ts=ts,
        temperature_c=21.4375,
        humidity_pct=humidity,
        pressure_hpa=pressure,
        time_uncertain=uncertain,
    )
    doc = json.loads(body)
    _validator("reading.v1.schema.json").validate(doc)
    assert ("pressure_hpa" in doc) is (pressure is not None)
    reading = decode_reading(body, "sensors.pi-a.s-1", now=datetime.now(UTC))
    assert reading.seq == 1_764_000_000_000_123
    assert reading.kind == kind
    assert reading.temperature_c == 21.4375
    assert reading.humidity_pct == humidity
    assert reading.pressure_hpa == pressure
    assert reading.time_uncertain is uncertain
    assert abs(reading.ts.timestamp() - ts) < 0.001


def test_pressure_is_only_for_a_kind_that_measures_it_on_both_sides() -> None:
    """The encoder refuses what the schema and the decoder refuse, naming field and value."""
    args: dict[str, object] = {
        "node": "pi-a",
        "sensor": "s-1",
        "seq": 1,
        "ts": time.time() - 5,
        "temperature_c": 21.5,
        "pressure_hpa": 1013.25,
    }
    with pytest.raises(ValueError, match=r"pressure_hpa: 1013\.25 given for a dht22"):
        reading_payload(kind="dht22", **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pressure_hpa: 1200\.0 is outside"):
        reading_payload(kind="bme280", **{**args, "pressure_hpa": 1200.0})  # type: ignore[arg-type]
    good = json.loads(reading_payload(kind="bme280", **args))  # type: ignore[arg-type]
    schema = _validator("reading.v1.schema.json")
    for kind, pressure in (("dht22", 1013.25), ("bme280", 1200.0), ("bme280", 299.0)):
        doc = {**good, "kind": kind, "pressure_hpa": pressure}
        assert not schema.is_valid(doc), doc
        with pytest.raises(Rejected, match=r"^pressure_hpa: "):
            decode_reading(json.dumps(doc).encode(), "sensors.pi-a.s-1", now=datetime.now(UTC))


def test_agent_status_messages_satisfy_schema_and_decoder() -> None:
    now = datetime.now(UTC)
    for body in (
        status_payload(node="pi-a", state="offline"),  # the Last Will
        status_payload(
            node="pi-a",
            state="online",
            ts=time.time(),
            agent_version="0.1.0",
            uptime_s=12.34,
            outbox_depth=3,
            dropped=0,
            read_errors={"t1": 2},
        ),
    ):
        _validator("status.v1.schema.json").validate(json.loads(body))
        decoded = decode_status(body, "status.pi-a", now=now)
        assert decoded.node == "pi-a"


def test_utc_iso_is_rfc3339_with_z() -> None:
    assert utc_iso(0.5) == "1970-01-01T00:00:00.500Z"


def test_schema_files_exist() -> None:
    assert {p.name for p in SCHEMAS.glob("*.schema.json")} >= {
        "reading.v1.schema.json",
        "status.v1.schema.json",
        "legacy.schema.json",
    }
    assert Path(SCHEMAS / "README.md").exists()
