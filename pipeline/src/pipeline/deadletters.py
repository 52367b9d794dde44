"""Dead letters: the consumer's copies of what it cannot use, and `pipeline dead list` / `pipeline
dead replay`, which look at them and re-drive them.

The consumer hands each delivery it cannot use to :class:`DeadLetterPublisher`, which publishes
a copy into the dead-letter queue with the reason and the pipeline's signed claims
(:func:`copy_properties`, header names from :mod:`tempmon_contract.deadletter`), in confirm
mode without waiting for each confirm; when the broker refuses a copy the delivery is rejected
instead (:meth:`DeadLetterPublisher.settle`), so the queue's dead-letter policy still keeps it.

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
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import pika
import pika.channel
import pika.data  # type: ignore[import-untyped]
import pika.exceptions
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pipeline import __version__
from pipeline.brokers import connect
from pipeline.decode import decode_reading, decode_status
from pipeline.errors import ConfigError, Rejected, SessionBrokenError
from pipeline.frames import content_frames, publish_method_frame, short_string
from pipeline.origin import BrokerInfo, establish, sign
from tempmon_contract.deadletter import (
    BROKER_DEATH_HEADERS,
    QUEUE_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REJECTED_BY_HEADER,
    REPLAYED_HEADER,
    ROUTING_KEY_HEADER,
    SIGNATURE_HEADER,
)

__all__ = [
    "DeadLetter",
    "DeadLetterPublisher",
    "Delivery",
    "ReplayResult",
    "copy_properties",
    "describe",
    "encode_copy_properties",
    "list_dead",
    "replay_dead",
    "source_queue",
]

log = logging.getLogger(__name__)

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
# Headers a dead-letter copy does not take over from the delivery: the broker's dead-letter
# record (a delivery from `readings` never carries a real one: only a publisher can have written
# it) and the pipeline's own claims, which the copy sets afresh.
_COPY_DROP: Final = BROKER_DEATH_HEADERS | {SIGNATURE_HEADER}


# --- the consumer's copies ---------------------------------------------------------------------


class Delivery(NamedTuple):
    """What the consumer keeps of a delivery (a tuple: it is made once per message).

    ``routing_key`` is the key the message was published under, as far as the pipeline can
    prove it; ``refused`` is set (to the reject reason) when a message put back into the queue
    claims an original routing key that is not proved (pipeline.origin).
    """

    tag: int
    queue: str
    routing_key: str
    properties: BasicProperties
    body: bytes
    refused: str | None = None


def copy_properties(
    delivery: Delivery, reason: str, *, key: bytes | None, now: datetime | None = None
) -> BasicProperties:
    """The properties of a delivery's dead-letter copy: its own headers, less the broker's
    dead-letter record and any signature, plus the reason, the original routing key and
    queue, when and by which program, and (with a ``key``) the pipeline's signature over them.

    A refused delivery's copy (a replay whose claim did not verify) stays unsigned, so it is
    never replayed under any key. ``now`` is for tests; the copy is stamped with the clock.
    :func:`encode_copy_properties` encodes the same properties without building them.
    """
    props = delivery.properties
    headers = _kept_headers(props)
    headers.update(_copy_headers(delivery, reason, key, now))
    return BasicProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        delivery_mode=2,  # persistent
        message_id=_copy_message_id(delivery),
        timestamp=props.timestamp,
        headers=headers,
    )


def _kept_headers(props: BasicProperties) -> dict[str, Any]:
    """The delivery's headers that its copy keeps (see ``_COPY_DROP``), in their order; the
    copy's own headers come after them."""
    return {
        k: v
        for k, v in (props.headers or {}).items()
        if k not in _COPY_DROP and k not in _COPY_HEADERS
    }


def _copy_headers(
    delivery: Delivery,
    reason: str,
    key: bytes | None,
    now: datetime | None,
    body_sha256: str | None = None,
) -> list[tuple[str, str]]:
    """The headers the copy adds, in order: reason, origin, when, by what, and signature
    (``body_sha256``: the body's SHA-256 hex digest, if the caller has it)."""
    rejected_at = (now or datetime.now(UTC)).isoformat(timespec="milliseconds")
    headers = [
        (REASON_HEADER, reason),
        (ROUTING_KEY_HEADER, delivery.routing_key),
        (QUEUE_HEADER, delivery.queue),
        (REJECTED_AT_HEADER, rejected_at),
        (REJECTED_BY_HEADER, _REJECTED_BY),
    ]
    if key is not None and delivery.refused is None:
        # Signed only when the routing key is the one the message was published under.
        signature = sign(
            key,
            routing_key=delivery.routing_key,
            queue=delivery.queue,
            body=delivery.body,
            reason=reason,
            rejected_at=rejected_at,
            body_sha256=body_sha256,
        )
        headers.append((SIGNATURE_HEADER, signature))
    return headers


def _copy_message_id(delivery: Delivery, body_sha256: str | None = None) -> str:
    """The delivery's message id, or its body's hash when it has none."""
    return (
        delivery.properties.message_id
        or (body_sha256 or hashlib.sha256(delivery.body).hexdigest())[:32]
    )


# The copy's own header names, as an AMQP table encodes them with a long-string value:
# the name as a short string, then "S".
_COPY_HEADERS: Final = (
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    QUEUE_HEADER,
    REJECTED_AT_HEADER,
    REJECTED_BY_HEADER,
    SIGNATURE_HEADER,
)
_NAME_PREFIX: Final = {name: bytes((len(name),)) + name.encode() + b"S" for name in _COPY_HEADERS}
_REJECTED_BY: Final = f"pipeline {__version__}"
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_FLAGS: Final = struct.Struct(">H")
# BasicProperties' flag bits for the properties a copy can carry (AMQP 0-9-1, basic class).
_CONTENT_TYPE, _CONTENT_ENCODING, _HEADERS, _DELIVERY_MODE = 0x8000, 0x4000, 0x2000, 0x1000
_MESSAGE_ID, _TIMESTAMP = 0x0080, 0x0040
_KEPT_CACHED: Final = 256


def encode_copy_properties(
    delivery: Delivery,
    reason: str,
    *,
    key: bytes | None,
    now: datetime | None = None,
    kept: dict[int, tuple[BasicProperties, bytes]] | None = None,
) -> tuple[bytes, str]:
    """:func:`copy_properties`, encoded: the property flags and list of the copy's content
    header (what ``copy_properties(...).encode()`` joins to), and the copy's message id.

    The copy's own headers are strings with fixed names, encoded here directly; the headers
    kept from the delivery are encoded by pika, once per properties object when ``kept`` (a
    cache the caller owns) is given: deliveries through pipeline.frames share one properties
    object per distinct encoding.
    """
    props = delivery.properties
    cached = kept.get(id(props)) if kept is not None else None
    if cached is not None and cached[0] is props:
        kept_table = cached[1]
    else:
        pieces: list[bytes] = []
        pika.data.encode_table(pieces, _kept_headers(props))
        kept_table = b"".join(pieces[1:])  # without the table's length
        if kept is not None:
            if len(kept) >= _KEPT_CACHED:
                kept.clear()
            kept[id(props)] = (props, kept_table)
    # The body's hash serves the signature and, without a message id, the copy's id: once.
    digest = (
        hashlib.sha256(delivery.body).hexdigest()
        if key is not None or not props.message_id
        else None
    )
    table = [kept_table]
    for name, value in _copy_headers(delivery, reason, key, now, digest):
        raw = value.encode()
        table += (_NAME_PREFIX[name], _U32.pack(len(raw)), raw)
    table_bytes = b"".join(table)
    message_id = _copy_message_id(delivery, digest)
    flags = _HEADERS | _DELIVERY_MODE | _MESSAGE_ID
    fields = []
    if props.content_type is not None:
        flags |= _CONTENT_TYPE
        fields.append(short_string(props.content_type))
    if props.content_encoding is not None:
        flags |= _CONTENT_ENCODING
        fields.append(short_string(props.content_encoding))
    fields += (_U32.pack(len(table_bytes)), table_bytes, b"\x02", short_string(message_id))
    if props.timestamp is not None:
        flags |= _TIMESTAMP
        fields.append(_U64.pack(props.timestamp))
    return _FLAGS.pack(flags) + b"".join(fields), message_id


class DeadLetterPublisher:
    """Publishes dead-letter copies in confirm mode without waiting for each confirm.

    pika's BlockingChannel waits for the confirm of every publish in confirm mode: one round
    trip (and the quorum queue's commit) per unusable message. This drives the channel's
    underlying pika Channel instead, as pika's own asynchronous adapters do: publishes go out
    at once, and the broker's Basic.Ack/Nack frames (one may confirm many) are collected by the
    callbacks and handed out by :meth:`settled` on the session's thread, where the originals
    are then acknowledged or rejected (:meth:`settle`). A copy the broker returns (mandatory, no
    queue to route to) or nacks is a failure.

    Raises:
        SessionBrokenError: confirms were not turned on within ``timeout_s``.
    """

    def __init__(
        self, channel: BlockingChannel, connection: pika.BlockingConnection, *, timeout_s: float
    ) -> None:
        # The blocking channel's underlying channel (see the class docstring).
        impl: pika.channel.Channel = getattr(channel, "_impl")  # noqa: B009
        self._impl = impl
        # Where a copy's marshalled frames go (pika's own output step), if this pika has it.
        output = getattr(getattr(impl, "connection", None), "_output_marshaled_frames", None)
        self._output: Callable[[list[bytes]], None] | None = output if callable(output) else None
        self._methods: dict[str, bytes] = {}  # dead-letter queue -> its Basic.Publish frame
        self._kept: dict[int, tuple[BasicProperties, bytes]] = {}
        self._sent = 0
        # publish number -> (original delivery, the copy's message id, the reason it carries);
        # in publish order
        self._pending: dict[int, tuple[Delivery, str | None, object]] = {}
        self._returned: list[tuple[str | None, bytes]] = []
        self._confirms: list[tuple[bool, int, bool]] = []  # (ack, publish number, multiple)
        selected: list[bool] = []
        impl.add_on_return_callback(self._on_return)
        impl.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=lambda _frame: selected.append(True)
        )
        deadline = time.monotonic() + timeout_s
        while not selected:
            if time.monotonic() > deadline:
                raise SessionBrokenError("the broker did not turn on publisher confirms")
            connection.process_data_events(time_limit=0.05)  # type: ignore[arg-type]

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def dead_letter(
        self, delivery: Delivery, reason: str, dead_queue: str, *, key: bytes | None
    ) -> None:
        """Publish the delivery's copy (:func:`copy_properties`) into ``dead_queue``; its
        confirm comes later (:meth:`settle`).

        The copy's frames are marshalled here (:func:`encode_copy_properties`,
        pipeline.frames) and handed to pika's output step, the bytes pika's ``basic_publish``
        would write; a closed channel, or a pika without that step, takes pika's own way.
        """
        output = self._output
        impl = self._impl
        if output is None or not impl.is_open:
            self.publish(delivery, dead_queue, copy_properties(delivery, reason, key=key))
            return
        method = self._methods.get(dead_queue)
        if method is None:
            method = publish_method_frame(impl.channel_number, "", dead_queue, mandatory=True)
            self._methods[dead_queue] = method
        properties, message_id = encode_copy_properties(delivery, reason, key=key, kept=self._kept)
        body_max: int = getattr(impl.connection, "_body_max_length")  # noqa: B009
        frames = content_frames(impl.channel_number, properties, delivery.body, body_max)
        # One chunk for pika's output step: its write path runs once per chunk, not per frame.
        output([b"".join((method, *frames))])
        self._sent += 1
        self._pending[self._sent] = (delivery, message_id, reason)

    def publish(self, delivery: Delivery, queue_name: str, properties: BasicProperties) -> None:
        self._impl.basic_publish("", queue_name, delivery.body, properties, mandatory=True)
        self._sent += 1
        reason = (properties.headers or {}).get(REASON_HEADER)
        self._pending[self._sent] = (delivery, properties.message_id, reason)

    def _on_return(
        self,
        _channel: pika.channel.Channel,
        _method: Basic.Return,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        self._returned.append((properties.message_id, body))

    def _on_confirm(self, frame: pika.frame.Method) -> None:  # type: ignore[type-arg]
        method = frame.method
        self._confirms.append(
            (
                isinstance(method, Basic.Ack),
                int(method.delivery_tag or 0),
                bool(method.multiple),
            )
        )

    def settled(self) -> list[tuple[Delivery, str | None]]:
        """Copies confirmed since the last call: (original, None) or (original, why it failed)."""
        return [(delivery, failure) for delivery, failure, _ in self._settled()]

    def _settled(self) -> list[tuple[Delivery, str | None, object]]:
        if not self._confirms:
            return []
        confirms, self._confirms = self._confirms, []
        done: list[tuple[Delivery, str | None, object]] = []
        for ack, number, multiple in confirms:
            if multiple:
                numbers = []
                for n in self._pending:
                    if n > number:
                        break
                    numbers.append(n)
            else:
                numbers = [number] if number in self._pending else []
            for n in numbers:
                delivery, message_id, reason = self._pending.pop(n)
                failure = None if ack else "the broker refused the copy (basic.nack)"
                if (message_id, delivery.body) in self._returned:
                    self._returned.remove((message_id, delivery.body))
                    failure = "the dead-letter queue does not exist (basic.return)"
                done.append((delivery, failure, reason))
        return done

    def settle(self, channel: BlockingChannel) -> list[tuple[int, bool]]:
        """Settle the copies confirmed (or refused) since the last call.

        A delivery whose copy the broker refused is rejected on ``channel`` (the one it was
        consumed on) with ``basic_nack(requeue=False)`` instead, so the queue's dead-letter
        policy still keeps it (with ``x-death`` but without the reason, which is logged).

        Returns:
            ``(delivery tag, ready)`` per settled delivery: ready to be acknowledged (its copy
            is confirmed), or not (it was rejected here).
        """
        done: list[tuple[int, bool]] = []
        for delivery, failure, reason in self._settled():
            if failure is not None:
                log.error(
                    "dead-letter copy refused, rejecting instead queue=%s error=%s reason=%s",
                    delivery.queue,
                    failure,
                    _text(reason, 200),
                )
                channel.basic_nack(delivery.tag, requeue=False)
            done.append((delivery.tag, failure is None))
        return done


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
            headers[REPLAYED_HEADER] = _count(headers.get(REPLAYED_HEADER)) + 1
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
