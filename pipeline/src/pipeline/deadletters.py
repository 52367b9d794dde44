"""`pipeline dead list` and `pipeline dead replay`: look at dead letters, and re-drive them.

A dead letter is either a copy the consumer made with its reason (``x-reject-reason``) or a
message the broker dead-lettered by policy (``x-death``: rejected, expired, delivery limit
exceeded). Replay publishes each one back into the queue its dead-letter queue belongs to
(``readings.dead`` -> ``readings``), with its original routing key in ``x-original-routing-key``
and the pipeline's signature over it, so the consumer decodes it again with the current code;
what is still unusable comes back to the dead-letter queue with a fresh reason.

The original routing key is the node's identity, and only what the pipeline signed or what the
broker recorded itself proves it (pipeline.origin). A dead letter whose origin cannot be proved
is listed as unverified, with the claimed key shown only as a claim, and replay leaves it where
it is: putting it back under a key its publisher wrote would store one node's readings under
another node's id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import BasicProperties

from pipeline.brokers import connect
from pipeline.decode import decode_reading, decode_status
from pipeline.errors import ConfigError, Rejected
from pipeline.origin import (
    BROKER_DEATH_HEADERS,
    QUEUE_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REJECTED_BY_HEADER,
    ROUTING_KEY_HEADER,
    SIGNATURE_HEADER,
    BrokerInfo,
    establish,
    sign,
)

__all__ = ["DeadLetter", "ReplayResult", "describe", "list_dead", "replay_dead", "source_queue"]

_DEAD_SUFFIX: Final = ".dead"
# What a replay does not carry back: the reason and the broker's record belong to this death,
# and the claims and signature are set afresh.
_REPLAY_DROP: Final = BROKER_DEATH_HEADERS | {
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REJECTED_BY_HEADER,
    ROUTING_KEY_HEADER,
    QUEUE_HEADER,
    SIGNATURE_HEADER,
}
_PREVIEW_BYTES: Final = 160
_CLAIM_MAX: Final = 120


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What a dead letter says about itself, and how much of it is proved.

    ``routing_key`` and ``queue`` are the original ones only when ``origin`` is ``signed`` (the
    pipeline signed them) or ``broker`` (the broker recorded them itself); for ``unverified``
    they are empty and ``claimed_routing_key`` holds what the message's headers claim, which
    anyone who could publish it may have written. ``origin_note`` says which, and why.
    """

    queue: str
    routing_key: str
    origin: str
    origin_note: str
    claimed_routing_key: str
    reason: str
    rejected_at: str
    deaths: int
    size: int
    preview: str

    def as_dict(self) -> dict[str, object]:
        return {
            "queue": self.queue,
            "routing_key": self.routing_key,
            "origin": self.origin,
            "origin_note": self.origin_note,
            "claimed_routing_key": self.claimed_routing_key,
            "reason": self.reason,
            "rejected_at": self.rejected_at,
            "deaths": self.deaths,
            "size": self.size,
            "preview": self.preview,
        }


def _text(value: object, limit: int = 1000) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(value: object) -> int:
    """A header's count as an int, 0 for anything else: publishers write these headers too."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, min(value, 2**31))
    if isinstance(value, str | bytes) and value.strip().isdigit() and len(value) < 10:
        return int(value)
    return 0


def source_queue(dead_queue: str) -> str:
    """The queue a dead-letter queue belongs to: ``readings.dead`` -> ``readings``.

    Raises:
        ConfigError: the name does not end in ``.dead``.
    """
    if not dead_queue.endswith(_DEAD_SUFFIX) or dead_queue == _DEAD_SUFFIX:
        raise ConfigError(
            f"--queue {dead_queue!r} is not a dead-letter queue: their names end in "
            f"{_DEAD_SUFFIX} (readings.dead, node-status.dead)"
        )
    return dead_queue.removesuffix(_DEAD_SUFFIX)


def describe(
    props: BasicProperties,
    body: bytes,
    *,
    key: bytes | None,
    broker: BrokerInfo,
    dead_queue: str,
) -> DeadLetter:
    """What a dead-lettered message says about itself, with its origin proved or not."""
    headers: Mapping[str, Any] = props.headers or {}
    source = dead_queue.removesuffix(_DEAD_SUFFIX)
    origin = establish(headers, body, key=key, broker=broker, source_queue=source)
    raw_deaths = headers.get("x-death")
    listed = raw_deaths if isinstance(raw_deaths, list) else []
    deaths = [d for d in listed if isinstance(d, Mapping)]
    first = deaths[0] if deaths else {}
    # x-reject-reason is covered by the signature; on anything else a publisher may have
    # written it, so the broker's record wins, and an unverified message's is marked as a claim.
    reason = _text(headers.get(REASON_HEADER)) if origin.source != "broker" else ""
    if reason and origin.source == "unverified":
        reason += " (from its headers, not verified)"
    if not reason:
        why = _text(first.get("reason"), 40) or "unknown"
        reason = f"dead-lettered by the broker ({why}); no reason recorded"
    at = _text(headers.get(REJECTED_AT_HEADER), 40) if origin.source != "broker" else ""
    if not at and isinstance(first.get("time"), datetime):
        at = first["time"].astimezone(UTC).isoformat()
    count = sum(_count(d.get("count", 1)) for d in deaths) or 1
    preview = body[:_PREVIEW_BYTES].decode("utf-8", "backslashreplace")
    if len(body) > _PREVIEW_BYTES:
        preview += f"... ({len(body)} bytes)"
    claimed = "" if origin.routing_key else _text(headers.get(ROUTING_KEY_HEADER), _CLAIM_MAX)
    return DeadLetter(
        queue=origin.queue,
        routing_key=origin.routing_key,
        origin=origin.source,
        origin_note=origin.note,
        claimed_routing_key=claimed,
        reason=reason,
        rejected_at=at,
        deaths=count,
        size=len(body),
        preview=preview,
    )


def _connect(urls: str | Sequence[str]) -> pika.BlockingConnection:
    """A connection to one of the nodes (pipeline.brokers.connect: any node of a cluster)."""
    return connect(urls)[0]


def _broker(conn: pika.BlockingConnection) -> BrokerInfo:
    """The broker's product and version from the connection handshake.

    pika keeps them on the connection's implementation only; if that ever moves, the broker
    is unknown, and its ``x-death`` is not trusted (the safe side).
    """
    impl = getattr(conn, "_impl", None)
    return BrokerInfo.from_server_properties(getattr(impl, "server_properties", None))


def _browse(channel: BlockingChannel, queue: str, limit: int) -> Iterator[tuple[Any, Any, bytes]]:
    for _ in range(limit):
        method, props, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        # The pika stubs say str; pika hands over the raw bytes.
        yield method, props, body if isinstance(body, bytes) else b""


def list_dead(
    urls: str | Sequence[str], queue: str, limit: int = 50, *, key: bytes | None
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``queue``, left in the queue.

    Args:
        urls: the AMQP URL (the pipeline's account), or the URLs of a cluster's nodes.
        queue: the dead-letter queue.
        limit: at most this many are looked at.
        key: the pipeline's signing key, to check signatures (None: none verifies).
    """
    with contextlib.closing(_connect(urls)) as conn:
        broker = _broker(conn)
        channel = conn.channel()
        # Unacknowledged gets go back to the queue when the channel closes.
        return [
            describe(p, b, key=key, broker=broker, dead_queue=queue)
            for _, p, b in _browse(channel, queue, limit)
        ]


@dataclass
class ReplayResult:
    replayed: int = 0
    would_store: int = 0
    would_reject: int = 0
    unverified: int = 0  # left in place: their origin cannot be proved


def replay_dead(
    urls: str | Sequence[str],
    queue: str,
    limit: int,
    *,
    key: bytes | None,
    dry_run: bool = False,
) -> ReplayResult:
    """Put up to ``limit`` dead letters back into the queue ``queue`` belongs to.

    ``urls`` is the AMQP URL, or the URLs of a cluster's nodes (one of them is used).

    Takes at most as many messages as the queue held when it started, so a message that dies
    again is not replayed twice in one run. Only dead letters whose origin is proved are put
    back, signed; the others stay in ``queue`` (counted in ``unverified``). With ``dry_run``
    nothing is published: each message is decoded with the current code to say whether it
    would now be stored.

    Raises:
        ConfigError: ``queue`` is not a dead-letter queue, or there is no key to sign with.
    """
    target = source_queue(queue)
    if key is None and not dry_run:
        raise ConfigError(
            "no key to sign replayed messages with: give the AMQP password (RABBITMQ_PASSWORD "
            "or in RABBITMQ_URL) or PIPELINE_DEAD_LETTER_KEY, as `pipeline consume` has them"
        )
    result = ReplayResult()
    with contextlib.closing(_connect(urls)) as conn:
        broker = _broker(conn)
        channel = conn.channel()
        depth = int(channel.queue_declare(queue, passive=True).method.message_count or 0)
        publisher = conn.channel()
        publisher.confirm_delivery()
        for method, props, body in _browse(channel, queue, min(limit, depth)):
            dead = describe(props, body, key=key, broker=broker, dead_queue=queue)
            if dead.origin == "unverified" or dead.queue != target:
                # Left unacknowledged: it goes back to the queue when the channel closes.
                result.unverified += 1
                continue
            if dry_run:
                if _usable(dead, body):
                    result.would_store += 1
                else:
                    result.would_reject += 1
                continue
            assert key is not None  # noqa: S101 - checked above, for dry runs only
            headers = {k: v for k, v in dict(props.headers or {}).items() if k not in _REPLAY_DROP}
            headers[ROUTING_KEY_HEADER] = dead.routing_key
            headers[QUEUE_HEADER] = target
            headers["x-replayed"] = _count(headers.get("x-replayed")) + 1
            headers[SIGNATURE_HEADER] = sign(
                key, routing_key=dead.routing_key, queue=target, body=body
            )
            copy = BasicProperties(
                content_type=props.content_type,
                content_encoding=props.content_encoding,
                delivery_mode=2,
                message_id=props.message_id,
                timestamp=props.timestamp,
                headers=headers,
            )
            publisher.basic_publish("", target, body, copy, mandatory=True)
            channel.basic_ack(method.delivery_tag)
            result.replayed += 1
    return result


def _usable(dead: DeadLetter, body: bytes) -> bool:
    now = datetime.now(UTC)
    try:
        if dead.routing_key.startswith("status."):
            decode_status(body, dead.routing_key, now=now)
        else:
            decode_reading(body, dead.routing_key, now=now)
    except Rejected:
        return False
    return True
