"""The contract package held to everything else that states the contract.

``tempmon_contract`` is the executable contract; the JSON Schema files in ``gateway/schema/``
are the published one. These tests hold the two to each other field by field, and the other
places that must repeat a rule in another language (the broker's ``users.sh``, the Ansible
roles' validation) to the package. The database's CHECK constraints are held to it in
``tests/system/test_contract_sql.py`` (they need a PostgreSQL).
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tempmon_contract import deadletter, ids, kinds, wire
from tempmon_contract.retry import Backoff
from tests.harness.procs import REPO

SCHEMAS = REPO / "gateway" / "schema"


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return loaded


READING = _schema("reading.v1.schema.json")
STATUS = _schema("status.v1.schema.json")


def _kind_rules(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kind -> the ``then`` properties of the allOf rules whose ``if`` names that one kind."""
    rules: dict[str, dict[str, Any]] = {}
    for rule in schema["allOf"]:
        cond = rule["if"]["properties"]["kind"]
        if "const" in cond:
            rules.setdefault(cond["const"], {}).update(rule["then"]["properties"])
    return rules


def _excluded(schema: dict[str, Any], field: str) -> set[str]:
    """The kinds for which the schema forces ``field`` to null (they do not measure it)."""
    for rule in schema["allOf"]:
        then = rule["then"]["properties"].get(field)
        if then == {"type": "null"}:
            return set(rule["if"]["properties"]["kind"]["enum"])
    return set()


# --- the schema and the package --------------------------------------------------------------


def test_schema_ids_are_the_contracts() -> None:
    for schema in (READING, STATUS):
        id_def = schema["$defs"]["id"]
        assert id_def["pattern"] == f"^{ids.ID_PATTERN}$"
        assert id_def["maxLength"] == ids.ID_MAX
    assert STATUS["properties"]["session"]["pattern"] == f"^{ids.SESSION.pattern}$"


def test_schema_reading_fields_are_the_contracts() -> None:
    assert READING["required"] == list(wire.READING_REQUIRED)
    assert list(READING["properties"]) == list(wire.READING_FIELDS)
    assert READING["properties"]["version"]["const"] == wire.VERSION
    assert READING["properties"]["seq"]["maximum"] == wire.MAX_SEQ
    assert str(wire.MAX_PAYLOAD_BYTES) in READING["description"]


def test_schema_status_fields_are_the_contracts() -> None:
    assert STATUS["required"] == list(wire.STATUS_REQUIRED)
    assert set(STATUS["properties"]) == set(wire.STATUS_FIELDS)
    assert set(STATUS["properties"]["state"]["enum"]) == wire.STATES
    assert STATUS["properties"]["outbox_depth"]["maximum"] == wire.MAX_COUNTER


def test_schema_kinds_and_ranges_are_the_contracts() -> None:
    assert READING["properties"]["kind"]["enum"] == list(kinds.KINDS)
    rules = _kind_rules(READING)
    assert set(rules) == set(kinds.KINDS)
    for name, spec in kinds.KINDS.items():
        temperature = rules[name][kinds.TEMPERATURE.field]
        assert (temperature["minimum"], temperature["maximum"]) == spec.temperature, name
    widest = READING["properties"][kinds.TEMPERATURE.field]
    assert (widest["minimum"], widest["maximum"]) == (kinds.TEMPERATURE.low, kinds.TEMPERATURE.high)
    assert kinds.LEGACY.temperature == (kinds.TEMPERATURE.low, kinds.TEMPERATURE.high)


@pytest.mark.parametrize("quantity", kinds.OPTIONAL_QUANTITIES, ids=lambda q: q.field)
def test_schema_optional_quantities_are_the_contracts(quantity: kinds.Quantity) -> None:
    prop = READING["properties"][quantity.field]
    assert (prop["minimum"], prop["maximum"]) == (quantity.low, quantity.high)
    assert prop["type"] == ["number", "null"]
    measuring = {name for name, spec in kinds.KINDS.items() if quantity.field in spec.measures}
    assert measuring, f"no kind measures {quantity.field}"
    assert _excluded(READING, quantity.field) == set(kinds.KINDS) - measuring


def test_schema_readme_names_every_kind() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    for name, spec in kinds.KINDS.items():
        low, high = spec.temperature
        assert f"{name} {low:g}..{high:g}" in readme, name
    for quantity in kinds.OPTIONAL_QUANTITIES:
        assert f"`{quantity.field}`" in readme


def test_deadletter_headers_are_distinct_and_not_the_brokers() -> None:
    names = [
        value
        for key, value in vars(deadletter).items()
        if key.endswith("_HEADER") and isinstance(value, str)
    ]
    assert len(names) == len(set(names)) == 7
    assert not set(names) & deadletter.BROKER_DEATH_HEADERS
    assert all(name.startswith("x-") for name in names)


# --- the other places that state a rule of the contract ---------------------------------------


def test_ansible_id_checks_are_the_contracts() -> None:
    wanted = f"^{ids.ID_PATTERN}$"
    for path in (
        REPO / "ansible/roles/edge_agent/tasks/validate.yml",
        REPO / "ansible/roles/gateway/tasks/validate.yml",
    ):
        text = path.read_text(encoding="utf-8")
        assert f"match('{wanted}')" in text, path


@pytest.mark.parametrize(
    ("name", "ok"),
    [("pi-1", True), ("a" * ids.ID_MAX, True), ("a" * (ids.ID_MAX + 1), False), ("a.b", False)],
)
def test_users_script_takes_exactly_the_contracts_ids(name: str, ok: bool) -> None:
    """users.sh checks a node's user name before anything else; /bin/false as rabbitmqctl
    makes every later step fail, so an accepted id fails later, not with exit 2."""
    assert bool(ids.ID.fullmatch(name)) is ok
    done = subprocess.run(
        ["sh", str(REPO / "gateway/rabbitmq/users.sh"), "node", name],
        input="a-long-enough-password",
        capture_output=True,
        text=True,
        check=False,
        env={"RABBITMQCTL": "/bin/false", "PATH": "/usr/bin:/bin"},
    )
    if ok:
        assert "is invalid" not in done.stderr
        assert "at most 64" not in done.stderr
    else:
        assert done.returncode == 2
        assert name[:10] in done.stderr


def test_contract_imports_only_the_standard_library() -> None:
    package = REPO / "contract/src/tempmon_contract"
    modules = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    code = (
        "import sys; before = set(sys.modules); "
        + "; ".join(f"import tempmon_contract.{m}" for m in modules)
        + "; new = {n.split('.')[0] for n in set(sys.modules) - before}; "
        "bad = new - set(sys.stdlib_module_names) - {'tempmon_contract'}; "
        "sys.exit(f'imports {sorted(bad)}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("edge_agent", "pipeline")), path


# --- the encoder ------------------------------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _sample(name: str) -> dict[str, float]:
    spec = kinds.KINDS[name]
    low, high = spec.temperature
    values = {"temperature_c": (low + high) / 2 + 0.123456}
    for quantity in kinds.OPTIONAL_QUANTITIES:
        if quantity.field in spec.measures:
            qlow, qhigh = spec.range_of(quantity.field)
            values[quantity.field] = (qlow + qhigh) / 2 + 0.0004567
    return values


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_every_kind_encodes_to_a_valid_message(name: str) -> None:
    values = _sample(name)
    body = wire.reading_payload(
        node="pi-1", sensor="s-1", kind=name, seq=7, ts=NOW, time_uncertain=True, **values
    )
    doc = json.loads(body)
    Draft202012Validator(READING).validate(doc)
    assert list(doc) == [f for f in wire.READING_FIELDS if f in doc]
    assert len(body) < wire.MAX_PAYLOAD_BYTES
    for quantity in (kinds.TEMPERATURE, *kinds.OPTIONAL_QUANTITIES):
        if quantity.field in values:
            assert doc[quantity.field] == round(values[quantity.field], quantity.decimals)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "bmp180"}, "kind: 'bmp180' is not one of ds18b20, dht22, cpu, simulated, bme280"),
        ({"node": "a.b"}, "node: 'a.b' is not an id"),
        ({"sensor": "x" * 65}, "sensor: 'xxxxxxxx"),
        ({"seq": -1}, "seq: -1 is outside 0..9223372036854775807"),
        ({"seq": True}, "seq: True is outside"),
        ({"temperature_c": 125.5}, "temperature_c: 125.5 is outside what a ds18b20 can measure"),
        ({"temperature_c": math.nan}, "temperature_c: nan is not a finite number"),
        ({"temperature_c": "20"}, "temperature_c: '20' is not a finite number"),
        ({"humidity_pct": 50.0}, "humidity_pct: 50.0 given for a ds18b20, which measures no"),
        ({"pressure_hpa": 1000.0}, "pressure_hpa: 1000.0 given for a ds18b20"),
        ({"kind": "bme280", "pressure_hpa": 1100.5}, "pressure_hpa: 1100.5 is outside what"),
        ({"kind": "dht22", "humidity_pct": 100.1}, "humidity_pct: 100.1 is outside what a dht22"),
        ({"ts": datetime(2026, 6, 1, 12)}, "is naive"),  # noqa: DTZ001 - the point
    ],
)
def test_encoder_refuses_what_the_pipeline_would_reject(
    changes: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {
        "node": "pi-1",
        "sensor": "s-1",
        "kind": "ds18b20",
        "seq": 1,
        "ts": NOW,
        "temperature_c": 20.0,
    }
    args.update(changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        wire.reading_payload(**args)


def test_encoder_rounds_before_the_range_check() -> None:
    """125.00001 °C is 125.0 on the wire: inside a DS18B20's range, so it is sent."""
    body = wire.reading_payload(
        node="n", sensor="s", kind="ds18b20", seq=1, ts=NOW, temperature_c=125.00001
    )
    assert json.loads(body)["temperature_c"] == 125.0


def test_timestamps_keep_milliseconds_or_microseconds() -> None:
    assert wire.format_ts(NOW + timedelta(milliseconds=5)) == "2026-06-01T12:00:00.005Z"
    assert wire.format_ts(NOW + timedelta(microseconds=5)) == "2026-06-01T12:00:00.000005Z"
    assert wire.utc_iso(NOW.timestamp() + 0.25) == "2026-06-01T12:00:00.250Z"
    plus_two = NOW.astimezone(timezone(timedelta(hours=2)))
    assert wire.format_ts(plus_two) == "2026-06-01T12:00:00.000Z"


def test_status_payload_refuses_bad_state_and_session() -> None:
    with pytest.raises(ValueError, match="state: 'away'"):
        wire.status_payload(node="n", state="away")
    with pytest.raises(ValueError, match="16 lowercase hex digits"):
        wire.status_payload(node="n", state="online", session="ABC")
    doc = json.loads(wire.status_payload(node="n", state="online", session="0123456789abcdef"))
    Draft202012Validator(STATUS).validate(doc)


def test_topics_and_routing_keys() -> None:
    assert ids.reading_topic("pi-1", "s") == "sensors/pi-1/s"
    assert ids.status_topic("pi-1") == "status/pi-1"
    assert ids.sensor_of_routing_key(ids.reading_routing_key("pi-1", "s")) == ("pi-1", "s")
    assert ids.node_of_status_routing_key(ids.status_routing_key("pi-1")) == "pi-1"
    for bad in ("sensors.pi-1", "sensors.a.b.c", "status.a.b", "sensors.a b.c", "x.a.b"):
        assert ids.sensor_of_routing_key(bad) is None
    assert ids.node_of_status_routing_key("status.a.b") is None


def test_kind_ranges() -> None:
    bme = kinds.kind("bme280")
    assert bme.range_of("pressure_hpa") == (300, 1100)
    assert bme.range_of("humidity_pct") == (0, 100)
    assert bme.phrase == "a bme280 can measure"
    assert kinds.kind("simulated").phrase == "a simulated sensor may report"
    with pytest.raises(KeyError):
        bme.range_of("wind_ms")
    with pytest.raises(KeyError):
        kinds.kind("legacy")  # not a v1 kind


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(1.0, 4.0)
    waits = [backoff.next() for _ in range(5)]
    for wait, step in zip(waits, (1, 2, 4, 4, 4), strict=True):
        assert step / 2 <= wait <= step
    assert 0.5 <= backoff.short() <= 1.0
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1.0
    with pytest.raises(ValueError, match="initial 0"):
        Backoff(0, 1)


def test_package_layout() -> None:
    root = Path(kinds.__file__).parent
    assert (root / "py.typed").is_file()
