"""pipeline.origin and the dead-letter descriptions: what proves where a dead letter came from.

The headers here are shaped like the ones the brokers really deliver (see
tests/system/test_replay_identity.py, which makes them on RabbitMQ 3.10 and 4.0): a forged
``x-original-routing-key`` and ``x-death`` next to the broker's own record.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika.spec import BasicProperties

from pipeline.deadletters import _count, describe, source_queue
from pipeline.errors import ConfigError
from pipeline.origin import (
    BrokerInfo,
    _mac,
    derive_key,
    establish,
    key_id,
    sign,
    signed_claim,
    unsigned_claim_reason,
)

KEY = derive_key("the pipeline's amqp password")
OTHER_KEY = derive_key("another password")
BODY = b'{"id":"t1","data":"2025-06-01 11:59:00","temperatura":21.5}'
RABBITMQ4 = BrokerInfo("RabbitMQ", "4.0.5")
RABBITMQ3 = BrokerInfo("RabbitMQ", "3.10.8")
WHEN = datetime(2025, 6, 1, tzinfo=UTC)


def _death(routing_key: str, exchange: str = "amq.topic", queue: str = "readings") -> Any:
    return {
        "count": 1,
        "reason": "expired",
        "queue": queue,
        "time": WHEN,
        "exchange": exchange,
        "routing-keys": [routing_key],
    }


def _copy(key: bytes, routing_key: str = "sensors.pi-a.t1", **extra: Any) -> dict[str, Any]:
    """Headers of a dead-letter copy the consumer made and signed."""
    headers = {
        "x-reject-reason": "temperatura: 200 is outside what the legacy form allows (-100..150)",
        "x-original-routing-key": routing_key,
        "x-original-queue": "readings",
        "x-rejected-at": "2025-06-01T12:00:00.000+00:00",
        "x-rejected-by": "pipeline 1.0",
    }
    headers["x-pipeline-signature"] = sign(
        key,
        routing_key=routing_key,
        queue="readings",
        body=BODY,
        reason=headers["x-reject-reason"],
        rejected_at=headers["x-rejected-at"],
    )
    headers.update(extra)
    return headers


def test_a_signed_copy_proves_its_routing_key() -> None:
    origin = establish(_copy(KEY), BODY, key=KEY, broker=RABBITMQ3, source_queue="readings")
    assert (origin.source, origin.routing_key, origin.queue) == (
        "signed",
        "sensors.pi-a.t1",
        "readings",
    )
    assert signed_claim(KEY, _copy(KEY), BODY) == ("sensors.pi-a.t1", "readings")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"x-original-routing-key": "sensors.pi-victim.t1"}, "does not match"),
        ({"x-original-queue": "node-status"}, "does not match"),
        ({"x-reject-reason": "something else"}, "does not match"),
        ({"x-rejected-at": "2030-01-01T00:00:00Z"}, "does not match"),
        ({"x-pipeline-signature": "v1:" + key_id(KEY) + ":" + "0" * 64}, "does not match"),
        ({"x-pipeline-signature": "v1:" + key_id(KEY) + ":ü€\udcff"}, "does not match"),
        ({"x-pipeline-signature": "forged"}, "not a signature this pipeline makes"),
        ({"x-pipeline-signature": b"v1:ab:cd"}, "not a signature this pipeline makes"),
        ({"x-pipeline-signature": ["v1"]}, "not a signature this pipeline makes"),
        ({"x-original-routing-key": b"sensors.pi-a.t1"}, "not text"),
    ],
)
def test_a_changed_claim_or_a_forged_signature_proves_nothing(
    change: dict[str, Any], why: str
) -> None:
    headers = {**_copy(KEY), **change}
    assert signed_claim(KEY, headers, BODY) is None
    origin = establish(headers, BODY, key=KEY, broker=RABBITMQ4, source_queue="readings")
    assert origin.source == "unverified"
    assert origin.routing_key == ""
    assert why in origin.note


def test_a_signature_does_not_move_to_another_body() -> None:
    assert signed_claim(KEY, _copy(KEY), BODY + b" ") is None


def test_a_copy_signed_under_another_key_is_named_as_such() -> None:
    origin = establish(_copy(OTHER_KEY), BODY, key=KEY, broker=RABBITMQ4, source_queue="readings")
    assert origin.source == "unverified"
    assert f"key id {key_id(OTHER_KEY)!r}" in origin.note
    assert "PIPELINE_DEAD_LETTER_KEY" in origin.note
    without_key = establish(_copy(KEY), BODY, key=None, broker=RABBITMQ4, source_queue="readings")
    assert without_key.source == "unverified"


def test_rabbitmq_4_x_death_proves_the_routing_key_a_node_published_under() -> None:
    # What RabbitMQ 4.0 delivers after a node's message expired in `readings`: its own x-death,
    # next to the headers the node wrote (MQTT 5 user properties).
    headers = {
        "x-death": [_death("sensors.pi-mallory.t1")],
        "x-original-routing-key": "sensors.pi-victim.t1",
        "x-original-queue": "readings",
        "x-pipeline-signature": "abc",
    }
    origin = establish(headers, BODY, key=KEY, broker=RABBITMQ4, source_queue="readings")
    assert (origin.source, origin.routing_key) == ("broker", "sensors.pi-mallory.t1")
    assert "RabbitMQ 4.0.5" in origin.note


def test_rabbitmq_3_x_death_proves_nothing() -> None:
    # RabbitMQ 3.10 keeps a publisher's x-death and only raises the count of a matching entry.
    headers = {"x-death": [_death("sensors.pi-victim.t1")]}
    origin = establish(headers, BODY, key=KEY, broker=RABBITMQ3, source_queue="readings")
    assert origin.source == "unverified"
    assert "RabbitMQ 3.10.8 keeps an x-death its publisher wrote" in origin.note


@pytest.mark.parametrize(
    ("broker", "trusted"),
    [
        (RABBITMQ4, True),
        (BrokerInfo("RabbitMQ", "4.1.0"), True),
        (BrokerInfo("RabbitMQ", "10.0.0"), True),
        (RABBITMQ3, False),
        (BrokerInfo("RabbitMQ", "3.13.7"), False),  # not tested here: not trusted
        (BrokerInfo("RabbitMQ", ""), False),
        (BrokerInfo("RabbitMQ", "four"), False),
        (BrokerInfo("LavinMQ", "4.0.0"), False),
        (BrokerInfo.from_server_properties({"product": b"RabbitMQ", "version": b"4.0.5"}), True),
        (BrokerInfo.from_server_properties(None), False),
    ],
)
def test_which_brokers_write_their_own_x_death(broker: BrokerInfo, trusted: bool) -> None:
    assert broker.writes_its_own_x_death is trusted


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "not dead-lettered by the broker"),
        ({"x-death": "forged"}, "not dead-lettered by the broker"),
        ({"x-death": [_death("readings", exchange="")]}, "the default exchange"),
        ({"x-death": [_death("x.y", exchange="amq.direct")]}, "exchange 'amq.direct'"),
        ({"x-death": [_death("sensors.a.b", queue="node-status")]}, "no entry for readings"),
        ({"x-death": [{**_death(""), "routing-keys": []}]}, "names no node"),
        ({"x-death": [{**_death(""), "routing-keys": "sensors.a.b"}]}, "names no node"),
        # A copy made by a pipeline without a (valid) signature: a client published it, so
        # its x-death is no broker record even on RabbitMQ 4.
        (
            {"x-rejected-by": "pipeline 0.9", "x-death": [_death("sensors.pi-victim.t1")]},
            "copied here by a pipeline",
        ),
    ],
)
def test_what_proves_no_origin(headers: dict[str, Any], why: str) -> None:
    origin = establish(headers, BODY, key=KEY, broker=RABBITMQ4, source_queue="readings")
    assert origin.source == "unverified"
    assert why in origin.note


def test_the_consumer_names_an_unproved_claim() -> None:
    headers = {"x-original-routing-key": "sensors.pi-victim.t1"}
    reason = unsigned_claim_reason(KEY, headers, BODY, "readings")
    assert reason.startswith("x-original-routing-key: 'sensors.pi-victim.t1' is not proved")
    assert "not stored under that key" in reason
    signed_elsewhere = {**_copy(KEY), "x-reject-reason": "changed"}
    assert "does not match" in unsigned_claim_reason(KEY, signed_elsewhere, BODY, "readings")
    huge = {"x-original-routing-key": "x" * 100_000}
    assert len(unsigned_claim_reason(KEY, huge, BODY, "readings")) < 500


def test_dead_list_shows_an_unproved_claim_only_as_a_claim() -> None:
    props = BasicProperties(
        headers={
            "x-original-routing-key": "sensors.pi-victim.t1",
            "x-reject-reason": "fine, replay me",
            "x-death": [_death("sensors.pi-victim.t1")],
        }
    )
    dead = describe(props, BODY, key=KEY, broker=RABBITMQ3, dead_queue="readings.dead")
    assert dead.routing_key == ""
    assert dead.queue == ""
    assert dead.origin == "unverified"
    assert dead.claimed_routing_key == "sensors.pi-victim.t1"
    assert dead.reason == "fine, replay me (from its headers, not verified)"
    on_4 = describe(props, BODY, key=KEY, broker=RABBITMQ4, dead_queue="readings.dead")
    # On RabbitMQ 4 the record is the broker's; the reason header is the publisher's, ignored.
    assert (on_4.origin, on_4.routing_key, on_4.queue) == (
        "broker",
        "sensors.pi-victim.t1",
        "readings",
    )
    assert on_4.reason == "dead-lettered by the broker (expired); no reason recorded"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-death": "forged"},
        {"x-death": ["a", 1, None]},
        {"x-death": [{"count": "many", "time": "yesterday", "reason": ["x"]}]},
        {"x-death": [{"count": 10**30}]},
        {"x-replayed": "not a number", "x-reject-reason": b"\xff\xfe"},
        {"x-original-routing-key": {"a": 1}, "x-rejected-at": 5},
    ],
)
def test_hostile_headers_are_described_without_an_error(headers: dict[str, Any]) -> None:
    props = BasicProperties(headers=headers)
    for broker in (RABBITMQ3, RABBITMQ4):
        dead = describe(props, BODY, key=KEY, broker=broker, dead_queue="readings.dead")
        assert dead.origin == "unverified"
        assert dead.deaths >= 1


@pytest.mark.parametrize(
    ("value", "count"),
    [(3, 3), ("4", 4), (b"5", 5), (True, 0), ("x", 0), (-2, 0), (None, 0), (10**30, 2**31)],
)
def test_counts_from_headers(value: object, count: int) -> None:
    assert _count(value) == count


def test_replay_targets_only_the_queue_a_dead_letter_queue_belongs_to() -> None:
    assert source_queue("readings.dead") == "readings"
    assert source_queue("node-status.dead") == "node-status"
    for bad in ("readings", ".dead", "readings.dead.x"):
        with pytest.raises(ConfigError, match="not a dead-letter queue"):
            source_queue(bad)


@pytest.mark.parametrize(
    ("body", "reason", "rejected_at", "signature"),
    [
        (
            b'{"seq": 1}',
            "seq: missing",
            "2026-12-07T08:00:00.000+00:00",
            "v1:e1b3e6d3:c15df6eb439c9ca7957853edf1ef9f14c0caf6067e316e6f348d370fea6d2c64",
        ),
        (
            b"\xff\x00",
            "payload: \u00e9 \u2603",
            "",
            "v1:e1b3e6d3:574c1192caf66865cdacaaeb979ef61f706c34575dc88914467902a1cab338be",
        ),
    ],
)
def test_signatures_are_the_ones_earlier_versions_made(
    body: bytes, reason: str, rejected_at: str, signature: str
) -> None:
    """Dead letters signed by an earlier version wait in users' queues: the same claims must
    still give the same signature (these vectors were made with json.dumps and hmac.new)."""
    assert (
        sign(
            KEY,
            routing_key="sensors.pi-a.t1",
            queue="readings",
            body=body,
            reason=reason,
            rejected_at=rejected_at,
        )
        == signature
    )


def _framed(*claims: str) -> bytes:
    """The signed bytes as earlier versions made them: json.dumps of the claims."""
    return json.dumps(["v1", *claims], ensure_ascii=True, separators=(",", ":")).encode("ascii")


# Any character, lone surrogates often (plain st.text() never makes them).
_ANY_CHAR = st.characters() | st.characters(
    min_codepoint=0xD800, max_codepoint=0xDFFF, categories=None
)


@settings(max_examples=300)
@given(
    st.lists(st.text(_ANY_CHAR, max_size=80), min_size=4, max_size=4),
    st.binary(max_size=64),
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
def test_the_signed_bytes_are_json_dumps_of_the_claims(
    claims: list[str], body: bytes, digest: str
) -> None:
    """The signature's framing is built without json's encoder object, one string at a time:
    it must stay byte for byte what json.dumps makes of the claims (any text: quotes,
    backslashes, control characters, non-ASCII, lone surrogates)."""
    routing_key, queue, reason, rejected_at = claims
    body_digest = hashlib.sha256(body).hexdigest()
    expected = _framed(routing_key, queue, body_digest, reason, rejected_at)
    assert _mac(KEY, (routing_key, queue, reason, rejected_at), body) == (
        hmac.new(KEY, expected, hashlib.sha256).hexdigest()
    )
    # A digest the caller computed is the one signed.
    handed = _framed(routing_key, queue, digest, reason, rejected_at)
    assert _mac(KEY, (routing_key, queue, reason, rejected_at), body, digest) == (
        hmac.new(KEY, handed, hashlib.sha256).hexdigest()
    )
