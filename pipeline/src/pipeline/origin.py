"""Where a dead or replayed message came from, as far as it can be proved.

A node's identity is the routing key it published under: the broker lets node ``pi-07`` publish
only ``sensors.pi-07.<sensor>`` and ``status.pi-07`` (topic permissions), and the decoder takes
the node from that key. Once a message has been dead-lettered, its routing key is the dead-letter
queue's name, and the original key has to come from somewhere else. Message headers will not
do: a publisher writes whatever headers it likes (AMQP 0-9-1 headers; MQTT 5 user properties,
which RabbitMQ 3.13 and later turn into AMQP headers), and a message the broker dead-letters on
its own (expiry, delivery limit) keeps them. Trusting a header like ``x-original-routing-key``
let one node have its readings stored under another node's id after ``pipeline dead replay``.

So only two sources count:

* **the pipeline's signature**: when the pipeline copies a rejected delivery into a dead-letter
  queue, and when ``pipeline dead replay`` puts one back, it writes the original routing key and
  queue into headers and signs them with an HMAC-SHA256 (over the routing key, the queue, a
  SHA-256 of the body, and the reject reason and time) under a key that every pipeline replica
  shares and no node knows (:func:`derive_key`). Nodes cannot make a valid signature, and a
  signature does not move to another body or another key.
* **the broker's own dead-letter record** (``x-death``), but only from a broker that writes it
  itself. Tested (``tests/system/test_replay_identity.py``): RabbitMQ 4.0 replaces whatever
  ``x-death`` a publisher sent when it dead-letters a message; RabbitMQ 3.10 keeps a
  publisher's ``x-death`` and merges its own entry into it (an entry with the same queue and
  reason only has its count raised, routing keys and time stay the publisher's), so on 3.10 the
  record proves nothing. Versions in between were not tested and are not trusted. The record
  names the node only when the message was published to the exchange the nodes publish to
  (``amq.topic``); a message published straight to the queue (the default exchange) names none.

Anything else is *unverified*: ``pipeline dead list`` says so and shows the claimed key only as a
claim, ``pipeline dead replay`` leaves it where it is, and the consumer dead-letters a message put
back into its queue whose signature does not verify instead of storing it under the claimed key.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from tempmon_contract.deadletter import (
    QUEUE_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REJECTED_BY_HEADER,
    ROUTING_KEY_HEADER,
    SIGNATURE_HEADER,
)

__all__ = [
    "NODE_EXCHANGE",
    "BrokerInfo",
    "Origin",
    "derive_key",
    "establish",
    "key_id",
    "sign",
    "signed_claim",
    "unsigned_claim_reason",
]

NODE_EXCHANGE: Final = "amq.topic"
"""The exchange the nodes publish to (``mqtt.exchange`` in gateway/rabbitmq/rabbitmq.conf): only
there do topic permissions tie a routing key to the node that published it."""

_KEY_LABEL: Final = b"tempmon pipeline: dead-letter origin signatures, v1"
_VERSION: Final = "v1"
_SHOW_MAX: Final = 80
_BROKER_REWRITES_X_DEATH_FROM: Final = 4  # major version; see the module docstring
_VERSION_RE: Final = re.compile(r"([0-9]+)\.")

Source = Literal["signed", "broker", "unverified"]


def derive_key(secret: str) -> bytes:
    """The signing key made from a secret the pipeline replicas share (never the secret itself).

    HMAC-SHA256 of a fixed label under the secret, so a signature is no oracle for the secret
    (the AMQP password, by default) and the same secret used elsewhere gives another key.
    """
    return hmac.new(secret.encode("utf-8", "surrogatepass"), _KEY_LABEL, hashlib.sha256).digest()


@functools.lru_cache(maxsize=8)
def key_id(key: bytes) -> str:
    """A short, public name for a key, so a signature made under another key can be told apart
    from a forged one in ``pipeline dead list`` (it reveals nothing usable about the key)."""
    return hashlib.sha256(b"key id\x00" + key).hexdigest()[:8]


# One JSON string, as json.dumps(..., ensure_ascii=True) writes it (the C function it calls).
_JSON_STRING: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


def _mac(
    key: bytes, claims: tuple[str, str, str, str], body: bytes, body_sha256: str | None = None
) -> str:
    """HMAC-SHA256 over (routing key, queue, reason, rejected at) and the body's SHA-256
    (``body_sha256``, its hex digest, when the caller has it already)."""
    routing_key, queue, reason, rejected_at = claims
    digest = body_sha256 or hashlib.sha256(body).hexdigest()
    # JSON, so that no choice of strings can make two different tuples sign the same bytes: the
    # array json.dumps(..., ensure_ascii=True, separators=(",", ":")) makes of these strings,
    # joined here without building an encoder per call (tests/unit/test_pipeline_origin.py).
    items = (_VERSION, routing_key, queue, digest, reason, rejected_at)
    message = "[" + ",".join(map(_JSON_STRING, items)) + "]"
    return hmac.digest(key, message.encode("ascii"), "sha256").hex()  # one C call


def sign(
    key: bytes,
    *,
    routing_key: str,
    queue: str,
    body: bytes,
    reason: str = "",
    rejected_at: str = "",
    body_sha256: str | None = None,
) -> str:
    """The value of ``x-pipeline-signature`` for these claims about ``body``.

    ``reason`` and ``rejected_at`` are the ``x-reject-reason`` and ``x-rejected-at`` headers
    when the message carries them (a dead-letter copy), else empty (a replay).
    ``body_sha256`` is the body's SHA-256 hex digest if the caller has computed it.
    """
    mac = _mac(key, (routing_key, queue, reason, rejected_at), body, body_sha256)
    return f"{_VERSION}:{key_id(key)}:{mac}"


def _header_text(headers: Mapping[str, Any], name: str) -> str | None:
    """A header as text: None if missing or not a string (pika hands non-UTF-8 over as bytes)."""
    value = headers.get(name)
    if value is None:
        return ""
    return value if isinstance(value, str) else None


_SIGNED_HEADERS: Final = (ROUTING_KEY_HEADER, QUEUE_HEADER, REASON_HEADER, REJECTED_AT_HEADER)


def _signed_texts(headers: Mapping[str, Any]) -> tuple[str, str, str, str] | None:
    """The signed headers' values, "" for a missing one; None if one is not text."""
    texts = [_header_text(headers, name) for name in _SIGNED_HEADERS]
    if any(text is None for text in texts):
        return None
    routing_key, queue, reason, rejected_at = (text or "" for text in texts)
    return routing_key, queue, reason, rejected_at


def _check_signature(key: bytes | None, headers: Mapping[str, Any], body: bytes) -> str | None:
    """None if the signature verifies; else why not, in words for an operator."""
    raw = headers.get(SIGNATURE_HEADER)
    parts = raw.split(":") if isinstance(raw, str) else []
    claims = _signed_texts(headers)
    if raw is None:
        why = "not signed by a pipeline"
    elif key is None:
        why = "this pipeline has no signing key (no AMQP password, no PIPELINE_DEAD_LETTER_KEY)"
    elif len(parts) != 3 or parts[0] != _VERSION:
        why = f"{SIGNATURE_HEADER} is not a signature this pipeline makes"
    elif parts[1] != key_id(key):
        why = (
            f"signed under another key (key id {_clip(parts[1])}, this pipeline's is "
            f"{key_id(key)}): set PIPELINE_DEAD_LETTER_KEY as it was then, or it was forged"
        )
    elif claims is None:
        why = "a signed header is not text"
    elif not hmac.compare_digest(  # bytes: a str with non-ASCII characters would raise
        _mac(key, claims, body).encode("ascii"), parts[2].encode("utf-8", "replace")
    ):
        why = "the signature does not match the headers and the body"
    else:
        return None
    return why


def signed_claim(
    key: bytes | None, headers: Mapping[str, Any], body: bytes
) -> tuple[str, str] | None:
    """``(original routing key, original queue)`` if the pipeline signed them for this body."""
    if _check_signature(key, headers, body) is not None:
        return None
    routing_key = _header_text(headers, ROUTING_KEY_HEADER) or ""
    queue = _header_text(headers, QUEUE_HEADER) or ""
    if not routing_key or not queue:
        return None
    return routing_key, queue


def _clip(value: object) -> str:
    text = value[: _SHOW_MAX + 1] if isinstance(value, str | bytes) else value
    shown = repr(text) if not isinstance(text, list | dict) else f"<{type(text).__name__}>"
    return shown if len(shown) <= _SHOW_MAX else shown[: _SHOW_MAX - 3] + "..."


def unsigned_claim_reason(
    key: bytes | None, headers: Mapping[str, Any], body: bytes, queue: str
) -> str:
    """The reject reason for a message put back into ``queue`` whose claim does not verify."""
    why = _check_signature(key, headers, body)
    claim = headers.get(ROUTING_KEY_HEADER)
    if why is None:  # signed, but for another queue, or without a routing key
        why = f"it was signed for queue {_clip(_header_text(headers, QUEUE_HEADER))}"
    return (
        f"{ROUTING_KEY_HEADER}: {_clip(claim)} is not proved ({why}); a message put back into "
        f"{queue} keeps its original routing key only with this pipeline's {SIGNATURE_HEADER}, "
        "so it is not stored under that key"
    )


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """What the broker said about itself when the connection opened."""

    product: str
    version: str

    @classmethod
    def from_server_properties(cls, props: Mapping[str, Any] | None) -> BrokerInfo:
        def text(name: str) -> str:
            value = (props or {}).get(name)
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return value if isinstance(value, str) else ""

        return cls(text("product"), text("version"))

    @property
    def writes_its_own_x_death(self) -> bool:
        """True for RabbitMQ 4 and later, which replace a publisher's ``x-death`` (tested on
        4.0; 3.10 keeps it, and versions in between are not trusted without a test)."""
        match = _VERSION_RE.match(self.version)
        return (
            self.product == "RabbitMQ"
            and match is not None
            and int(match.group(1)) >= _BROKER_REWRITES_X_DEATH_FROM
        )

    def __str__(self) -> str:
        return f"{self.product or 'an unknown broker'} {self.version}".strip()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a dead letter came from: ``routing_key`` and ``queue`` are empty unless proved."""

    source: Source
    routing_key: str
    queue: str
    note: str  # how it was proved, or why it could not be


def _deaths(headers: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return []
    return [death for death in deaths if isinstance(death, Mapping)]


def establish(
    headers: Mapping[str, Any],
    body: bytes,
    *,
    key: bytes | None,
    broker: BrokerInfo,
    source_queue: str,
) -> Origin:
    """Where a message in ``source_queue``'s dead-letter queue came from, if it can be proved.

    Args:
        headers: the dead letter's AMQP headers.
        body: its body, as delivered.
        key: this pipeline's signing key (None: no signature can be checked).
        broker: the broker the message was read from.
        source_queue: the queue the dead-letter queue belongs to (``readings`` for
            ``readings.dead``); the broker's record must be about that queue.
    """
    why = _check_signature(key, headers, body)
    if why is None:
        claim = signed_claim(key, headers, body)
        if claim is not None:
            return Origin("signed", claim[0], claim[1], "signed by this pipeline")
        why = "signed, but without an original routing key and queue"
    if REJECTED_BY_HEADER in headers:
        # A copy made by a pipeline (an older one, or one with another key): published by a
        # client, so its x-death, if any, is a client's too.
        return Origin("unverified", "", "", f"copied here by a pipeline, but {why}")
    return _from_broker_record(headers, broker, source_queue, why)


def _from_broker_record(
    headers: Mapping[str, Any], broker: BrokerInfo, source_queue: str, why: str
) -> Origin:
    """The origin the broker's ``x-death`` proves, or why it proves none."""
    deaths = _deaths(headers)
    death = next((d for d in deaths if d.get("queue") == source_queue), None)
    keys = death.get("routing-keys") if death is not None else None
    first = keys[0] if isinstance(keys, list) and keys else None
    if not deaths:
        why += ", and not dead-lettered by the broker"
    elif not broker.writes_its_own_x_death:
        why += (
            f", and {broker} keeps an x-death its publisher wrote, so its record cannot be "
            "told from a forged one"
        )
    elif death is None:
        why += f", and x-death has no entry for {source_queue}"
    elif death.get("exchange") != NODE_EXCHANGE or not isinstance(first, str) or not first:
        exchange = death.get("exchange")
        where = "the default exchange" if exchange == "" else f"exchange {_clip(exchange)}"
        why += (
            f", and it was published to {source_queue} through {where}, so its routing key "
            "names no node"
        )
    else:
        return Origin("broker", first, source_queue, f"x-death written by {broker}")
    return Origin("unverified", "", "", why)
