"""gateway/schema/: the JSON Schemas, their example payloads, and the decoder agree.

Every valid example validates against its schema and decodes to the expected values. Every
invalid example is rejected by the decoder with a reason naming the field; where the example
says ``"schema": true`` the schema rejects it too, and where it says ``false`` the schema accepts
it (so the mark stays honest about which rules only the decoder enforces).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from pipeline.decode import NodeStatus, Reading, decode_reading, decode_status
from pipeline.errors import Rejected
from tempmon_contract.kinds import KINDS, OPTIONAL_QUANTITIES

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "gateway" / "schema"
EXAMPLES_DIR = SCHEMA_DIR / "examples"
SCHEMA_FILES = ("reading.v1.schema.json", "status.v1.schema.json", "legacy.schema.json")
DECODERS: dict[str, Callable[..., Reading | NodeStatus]] = {
    "decode_reading": decode_reading,
    "decode_status": decode_status,
}
CASE_KEYS = frozenset(
    {
        "name",
        "topic",
        "routing_key",
        "payload",
        "raw_text",
        "raw_base64",
        "raw_parts",
        "pad_to",
        "expect",
        "reason_contains",
        "schema",
        "why",
    }
)


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _example_files(suffix: str) -> list[Path]:
    return sorted(EXAMPLES_DIR.glob(f"*.{suffix}.json"))


def _cases(suffix: str) -> Iterator[Any]:
    for path in _example_files(suffix):
        document = _load(path)
        for case in document["cases"]:
            yield pytest.param(document, case, id=f"{path.stem}: {case['name']}")


def _validator(document: dict[str, Any]) -> Draft202012Validator:
    schema = _load(SCHEMA_DIR / document["schema_file"])
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _body(case: dict[str, Any]) -> bytes:
    if "raw_text" in case:
        return str(case["raw_text"]).encode("utf-8")
    if "raw_base64" in case:
        return base64.b64decode(case["raw_base64"], validate=True)
    if "raw_parts" in case:
        return b"".join(str(text).encode("utf-8") * int(times) for text, times in case["raw_parts"])
    body = json.dumps(case["payload"], ensure_ascii=False).encode("utf-8")
    if "pad_to" in case:
        assert len(body) <= case["pad_to"], "pad_to is smaller than the payload"
        body += b" " * (case["pad_to"] - len(body))
    return body


def _routing_key(case: dict[str, Any]) -> str:
    if "routing_key" in case:
        return str(case["routing_key"])
    # RabbitMQ's MQTT plugin maps topic levels to routing key words.
    return str(case["topic"]).replace("/", ".")


def _decode(document: dict[str, Any], case: dict[str, Any]) -> Reading | NodeStatus:
    decoder = DECODERS[document["decoder"]]
    now = datetime.fromisoformat(document["now"])
    return decoder(_body(case), _routing_key(case), now=now)


def _expected(document: dict[str, Any], expect: dict[str, Any]) -> Reading | NodeStatus:
    values = dict(expect)
    if values.get("ts") is not None:
        values["ts"] = datetime.fromisoformat(values["ts"])
    if document["decoder"] == "decode_reading":
        return Reading(**values)
    return NodeStatus(**values)


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = _load(SCHEMA_DIR / name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"]
    assert schema["title"]
    assert schema["description"]
    assert schema["additionalProperties"] is False


def _properties(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield f"{path}/properties/{name}", sub
        for key, sub in node.items():
            yield from _properties(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for index, sub in enumerate(node):
            yield from _properties(sub, f"{path}/{index}")


def _undocumented(node: Any, path: str) -> Iterator[str]:
    """Paths of properties and definitions without a description.

    The if/then branches under allOf only narrow a documented property's range, so they are
    skipped.
    """
    if isinstance(node, list):
        for index, sub in enumerate(node):
            yield from _undocumented(sub, f"{path}/{index}")
        return
    if not isinstance(node, dict):
        return
    for key, sub in node.items():
        if key == "allOf":
            continue
        if key in {"properties", "$defs"}:
            for name, child in sub.items():
                if not child.get("description"):
                    yield f"{path}/{key}/{name}"
        yield from _undocumented(sub, f"{path}/{key}")


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_every_property_and_definition_has_a_description(name: str) -> None:
    assert not list(_undocumented(_load(SCHEMA_DIR / name), "#"))


def test_shared_definitions_are_identical() -> None:
    reading = _load(SCHEMA_DIR / "reading.v1.schema.json")
    status = _load(SCHEMA_DIR / "status.v1.schema.json")
    legacy = _load(SCHEMA_DIR / "legacy.schema.json")
    assert reading["$defs"] == status["$defs"]
    legacy_id = legacy["properties"]["id"]["anyOf"][0]
    assert legacy_id["pattern"] == reading["$defs"]["id"]["pattern"]
    assert legacy_id["maxLength"] == reading["$defs"]["id"]["maxLength"]


@pytest.mark.parametrize(("document", "case"), list(_cases("valid")))
def test_valid_example_validates_and_decodes(document: dict[str, Any], case: Any) -> None:
    assert set(case) <= CASE_KEYS
    errors = [error.message for error in _validator(document).iter_errors(case["payload"])]
    assert not errors
    assert _decode(document, case) == _expected(document, case["expect"])


@pytest.mark.parametrize(("document", "case"), list(_cases("invalid")))
def test_invalid_example_is_rejected(document: dict[str, Any], case: Any) -> None:
    assert set(case) <= CASE_KEYS
    with pytest.raises(Rejected) as caught:
        _decode(document, case)
    reason = caught.value.reason
    assert case["reason_contains"] in reason
    assert len(reason) < 400
    if "payload" not in case:
        assert "schema" not in case, "raw bytes are not a JSON value: the schema cannot judge them"
        return
    if "pad_to" in case:
        return  # the payload is valid JSON; only its size is wrong
    assert "schema" in case, "say whether the schema can express this rule"
    schema_valid = _validator(document).is_valid(case["payload"])
    if case["schema"]:
        assert not schema_valid, "the schema should reject this payload too"
    else:
        assert schema_valid, "marked as decoder-only, but the schema rejects it: mark it true"
        assert case.get("why"), "say why the schema cannot express this rule"


def test_case_names_are_unique() -> None:
    for path in _example_files("valid") + _example_files("invalid"):
        names = [case["name"] for case in _load(path)["cases"]]
        assert len(names) == len(set(names)), path.name


def _reasons_named(file: str) -> set[str]:
    return {case["reason_contains"] for case in _load(EXAMPLES_DIR / file)["cases"]}


def test_invalid_examples_cover_every_field() -> None:
    reading_schema = _load(SCHEMA_DIR / "reading.v1.schema.json")
    status_schema = _load(SCHEMA_DIR / "status.v1.schema.json")
    legacy_schema = _load(SCHEMA_DIR / "legacy.schema.json")
    general = {"payload", "routing key"}
    assert set(reading_schema["properties"]) | general <= _reasons_named("reading.v1.invalid.json")
    assert set(status_schema["properties"]) | general <= _reasons_named("status.v1.invalid.json")
    assert set(legacy_schema["properties"]) | {"payload"} <= _reasons_named("legacy.invalid.json")


def test_valid_examples_cover_every_kind_and_option() -> None:
    cases = _load(EXAMPLES_DIR / "reading.v1.valid.json")["cases"]
    payloads = [case["payload"] for case in cases]
    assert {payload["kind"] for payload in payloads} == set(KINDS)
    for quantity in OPTIONAL_QUANTITIES:
        assert any(payload.get(quantity.field) is not None for payload in payloads)
        assert any(
            quantity.field in payload and payload[quantity.field] is None for payload in payloads
        )
    assert any(payload.get("time_uncertain") is True for payload in payloads)
    legacy = [case["payload"] for case in _load(EXAMPLES_DIR / "legacy.valid.json")["cases"]]
    assert {type(payload["id"]) for payload in legacy} == {int, str}
    assert any(" " in payload["data"] for payload in legacy)
    assert any("T" in payload["data"] for payload in legacy)
