"""`pipeline dead list` and `pipeline dead replay`: look at dead letters, and re-drive them.

A dead letter is either a copy the consumer made with its reason (``x-reject-reason``) or a
message the broker dead-lettered by policy (``x-death``: rejected, delivery limit exceeded).
Replay publishes each one back into the queue it came from, with its original routing key in
``x-original-routing-key``, so the consumer decodes it again with the current code; what is
still unusable comes back to the dead-letter queue with a fresh reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import BasicProperties

from pipeline.decode import decode_reading, decode_status
from pipeline.errors import Rejected

__all__ = ["DeadLetter", "list_dead", "replay_dead"]

_REPLAY_DROP = ("x-reject-reason", "x-rejected-at", "x-rejected-by", "x-death")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    queue: str  # the queue it died in
    routing_key: str  # the original routing key
    reason: str
    rejected_at: str
    deaths: int
    size: int
    preview: str

    def as_dict(self) -> dict[str, object]:
        return {
            "queue": self.queue,
            "routing_key": self.routing_key,
            "reason": self.reason,
            "rejected_at": self.rejected_at,
            "deaths": self.deaths,
            "size": self.size,
            "preview": self.preview,
        }


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def describe(routing_key: str, props: BasicProperties, body: bytes) -> DeadLetter:
    """What a dead-lettered message says about itself."""
    headers: dict[str, Any] = dict(props.headers or {})
    deaths = headers.get("x-death") or []
    first = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
    original_key = _text(headers.get("x-original-routing-key"))
    if not original_key:
        keys = first.get("routing-keys") or [routing_key]
        original_key = _text(keys[0])
    queue = _text(headers.get("x-original-queue")) or _text(first.get("queue")) or "?"
    reason = _text(headers.get("x-reject-reason"))
    if not reason:
        why = _text(first.get("reason")) or "unknown"
        reason = f"dead-lettered by the broker ({why}); no reason recorded"
    at = _text(headers.get("x-rejected-at"))
    if not at and isinstance(first.get("time"), datetime):
        at = first["time"].astimezone(UTC).isoformat()
    count = sum(int(d.get("count", 1)) for d in deaths if isinstance(d, dict)) or 1
    preview = body[:160].decode("utf-8", "backslashreplace")
    if len(body) > 160:
        preview += f"... ({len(body)} bytes)"
    return DeadLetter(queue, original_key, reason, at, count, len(body), preview)


def _connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def _browse(channel: BlockingChannel, queue: str, limit: int) -> Iterator[tuple[Any, Any, bytes]]:
    for _ in range(limit):
        method, props, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        # The pika stubs say str; pika hands over the raw bytes.
        yield method, props, body if isinstance(body, bytes) else b""


def list_dead(url: str, queue: str, limit: int = 50) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``queue``, left in the queue."""
    with contextlib.closing(_connect(url)) as conn:
        channel = conn.channel()
        # Unacknowledged gets go back to the queue when the channel closes.
        return [describe(m.routing_key, p, b) for m, p, b in _browse(channel, queue, limit)]


@dataclass
class ReplayResult:
    replayed: int = 0
    would_store: int = 0
    would_reject: int = 0


def replay_dead(url: str, queue: str, limit: int, *, dry_run: bool = False) -> ReplayResult:
    """Put up to ``limit`` dead letters back into their original queue.

    Takes at most as many messages as the queue held when it started, so a message that dies
    again is not replayed twice in one run. With ``dry_run`` nothing is published: each message
    is decoded with the current code to say whether it would now be stored.
    """
    result = ReplayResult()
    with contextlib.closing(_connect(url)) as conn:
        channel = conn.channel()
        depth = int(channel.queue_declare(queue, passive=True).method.message_count or 0)
        publisher = conn.channel()
        publisher.confirm_delivery()
        for method, props, body in _browse(channel, queue, min(limit, depth)):
            dead = describe(method.routing_key, props, body)
            if dry_run:
                if _usable(dead, body):
                    result.would_store += 1
                else:
                    result.would_reject += 1
                continue
            headers = {k: v for k, v in dict(props.headers or {}).items() if k not in _REPLAY_DROP}
            headers["x-original-routing-key"] = dead.routing_key
            headers["x-replayed"] = int(headers.get("x-replayed", 0) or 0) + 1
            copy = BasicProperties(
                content_type=props.content_type,
                content_encoding=props.content_encoding,
                delivery_mode=2,
                message_id=props.message_id,
                timestamp=props.timestamp,
                headers=headers,
            )
            target = dead.queue if dead.queue != "?" else queue.removesuffix(".dead")
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
