"""`pipeline consume`: the readings and node-status queues into PostgreSQL, exactly once.

Two threads share the work so that the database round trip overlaps the broker's:

* the AMQP thread (the caller of :func:`consume_forever`) owns the connection: it receives
  deliveries, decodes them, dead-letters what cannot be used, groups the rest into batches (by
  size or age, whichever comes first) and, when a batch has committed, acknowledges it with one
  ``basic_ack(multiple=True)``;
* the writer thread commits batches in order, one transaction each, and retries a batch while
  the database is unreachable: nothing is acknowledged meanwhile, so the broker keeps the
  messages and stops sending once the prefetch window is full.

A crash anywhere before the acknowledgement means redelivery, and the natural key makes the
second insert a no-op. The reconnect loop (:func:`consume_forever`) is separate from the
session (:class:`Session`), which owns one connection and ends when it drops.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pipeline import __version__
from pipeline.config import ConsumerSettings, redact
from pipeline.decode import NodeStatus, Reading, decode_reading, decode_status
from pipeline.errors import PipelineError, Rejected
from pipeline.metrics import BROKER_UP, DATABASE_UP, Metrics
from pipeline.origin import (
    BROKER_DEATH_HEADERS,
    QUEUE_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REJECTED_BY_HEADER,
    ROUTING_KEY_HEADER,
    SIGNATURE_HEADER,
    sign,
    signed_claim,
    unsigned_claim_reason,
)
from pipeline.store import BatchResult, Store

__all__ = ["Backoff", "Batch", "Session", "SessionBrokenError", "Writer", "consume_forever"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Errors that end a session: the connection or channel is gone; the outer loop reconnects.
_AMQP_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPError,
    ConnectionError,
    OSError,
)


# How long an orderly shutdown waits for the last batches to commit.
_SHUTDOWN_GRACE_S = 25.0


class SessionBrokenError(PipelineError, RuntimeError):
    """The session cannot go on safely; it ends so that its deliveries are redelivered."""


# Everything that ends a session and sends the outer loop to reconnect.
_SESSION_ENDED: tuple[type[BaseException], ...] = (*_AMQP_ERRORS, SessionBrokenError)


class Backoff:
    """Capped, jittered exponential back-off that resets after a healthy run."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not cryptography

    def reset(self) -> None:
        self._next = self.initial


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


# Headers a dead-letter copy does not take over from the delivery: the broker's dead-letter
# record (a delivery from `readings` never carries a real one: only a publisher can have written
# it) and the pipeline's own claims, which the copy sets afresh.
_COPY_DROP: Final = BROKER_DEATH_HEADERS | {SIGNATURE_HEADER}


@dataclass
class Batch:
    """Deliveries that will be committed in one transaction and acknowledged together."""

    session: Session
    started: float = field(default_factory=time.monotonic)
    readings: list[Reading] = field(default_factory=list)
    reading_deliveries: list[Delivery] = field(default_factory=list)
    statuses: list[NodeStatus] = field(default_factory=list)
    tags: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.tags)

    def add_reading(self, reading: Reading, delivery: Delivery) -> None:
        self.readings.append(reading)
        self.reading_deliveries.append(delivery)
        self.tags.append(delivery.tag)

    def add_status(self, status: NodeStatus, tag: int) -> None:
        self.statuses.append(status)
        self.tags.append(tag)


class Writer(threading.Thread):
    """Commits batches in the order they were handed over; never drops one on its own.

    While the database is unreachable the current batch is retried with back-off. When
    :meth:`stop` is called, the writer finishes what it has, giving up on a batch it still
    cannot commit after ``grace_s`` (that batch is then simply not acknowledged: redelivery).
    """

    def __init__(self, store: Store, metrics: Metrics, *, grace_s: float = 20.0) -> None:
        super().__init__(name="pipeline-writer", daemon=True)
        self._store = store
        self._metrics = metrics
        self._grace_s = grace_s
        self._queue: queue.Queue[Batch | None] = queue.Queue()
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")

    def submit(self, batch: Batch) -> None:
        self._queue.put(batch)

    def stop(self) -> None:
        """Finish the queued batches (or give up after the grace period), then end."""
        self._stop_deadline = time.monotonic() + self._grace_s
        self._stopping.set()
        self._queue.put(None)

    def run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                result = self._commit(batch)
                if result is not None:
                    batch.session.on_committed(batch, result)
            except Exception:
                # A bug must not kill the thread silently, and the batch must not be
                # acknowledged by a later batch's multiple ack: end the session, so every
                # unacknowledged delivery is redelivered.
                log.exception("writer failed on a batch; ending the session for redelivery")
                batch.session.fail("the writer failed on a batch")

    def _commit(self, batch: Batch) -> BatchResult | None:
        backoff = Backoff(0.2, 10.0)
        failures = 0
        while True:
            began = time.monotonic()
            try:
                result = self._store.write(batch.readings, batch.statuses)
            except (DBAPIError, SQLAlchemyError) as exc:
                DATABASE_UP.set(0)
                failures += 1
                if failures == 1:
                    log.warning(
                        "database unavailable, holding the batch unacknowledged "
                        "deliveries=%d error=%s",
                        batch.size,
                        _first_line(exc),
                    )
                if self._stopping.is_set() and time.monotonic() > self._stop_deadline:
                    log.warning("giving up on a batch at shutdown deliveries=%d", batch.size)
                    return None
                if batch.session.closed:
                    log.info("session ended while the database was down; batch will be redelivered")
                    return None
                time.sleep(backoff.next())
                continue
            DATABASE_UP.set(1)
            if failures:
                log.info("database reachable again after failures=%d", failures)
            self._metrics.on_batch(
                batch.size,
                result.inserted,
                result.duplicates,
                result.statuses,
                time.monotonic() - began,
            )
            return result


class Session:
    """One AMQP connection consuming the readings and node-status queues.

    Ends (returns or raises) when the connection drops or a stop is requested.
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        writer: Writer,
        metrics: Metrics,
        stop: threading.Event,
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._metrics = metrics
        self._stop = stop
        self._batch_age = settings.batch_ms / 1000
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._dead_channel: BlockingChannel | None = None
        self._batch: Batch | None = None
        self._rejected: list[tuple[Delivery, str]] = []
        self._in_flight = 0  # batches handed to the writer and not yet acknowledged
        # Counted here and handed to the metrics once per loop turn, not once per message.
        self._consumed_readings = 0
        self._consumed_statuses = 0
        self.closed = False
        self._broken: str | None = None  # set by the writer thread; ends the session
        self._now = datetime.now(UTC)

    # -- the session -----------------------------------------------------------------------
    def run(self) -> None:
        """Consume until a stop is requested; raise an AMQP error if the connection drops."""
        params = pika.URLParameters(self._settings.rabbitmq_url)
        params.heartbeat = 30
        params.blocked_connection_timeout = 300
        self._connection = pika.BlockingConnection(params)
        try:
            self._channel = self._connection.channel()
            self._channel.basic_qos(prefetch_count=self._settings.prefetch)
            self._dead_channel = self._connection.channel()
            self._dead_channel.confirm_delivery()
            s = self._settings
            self._channel.basic_consume(s.readings_queue, self._on_reading)
            self._channel.basic_consume(s.status_queue, self._on_status)
            BROKER_UP.set(1)
            log.info(
                "consuming queues=%s,%s prefetch=%d batch_size=%d batch_ms=%d",
                s.readings_queue,
                s.status_queue,
                s.prefetch,
                s.batch_size,
                s.batch_ms,
            )
            self._loop()
            self._shutdown()
        finally:
            BROKER_UP.set(0)
            self.closed = True
            if self._connection.is_open:
                with contextlib.suppress(*_AMQP_ERRORS):
                    self._connection.close()

    @property
    def _conn(self) -> pika.BlockingConnection:
        if self._connection is None:
            raise RuntimeError("session is not connected")
        return self._connection

    @property
    def _chan(self) -> BlockingChannel:
        if self._channel is None or self._dead_channel is None:
            raise RuntimeError("session has no channel")
        return self._channel

    def fail(self, reason: str) -> None:
        """End this session without acknowledging anything more (called from any thread)."""
        self._broken = reason

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._broken is not None:
                raise SessionBrokenError(self._broken)
            # One clock reading per turn for the decoder's "not in the future" check: a
            # turn lasts at most a batch age, far below the 300 s tolerance.
            self._now = datetime.now(UTC)
            self._conn.process_data_events(time_limit=self._wait_time())  # type: ignore[arg-type]
            self._settle_rejected()
            self._count_consumed()
            if self._batch is not None and (
                self._batch.size >= self._settings.batch_size
                or time.monotonic() - self._batch.started >= self._batch_age
            ):
                self._flush()
            self._metrics.maybe_log()

    def _count_consumed(self) -> None:
        if self._consumed_readings:
            self._metrics.on_consumed(self._settings.readings_queue, self._consumed_readings)
            self._consumed_readings = 0
        if self._consumed_statuses:
            self._metrics.on_consumed(self._settings.status_queue, self._consumed_statuses)
            self._consumed_statuses = 0

    def _wait_time(self) -> float:
        if self._batch is None:
            return 0.5
        return max(0.0, self._batch_age - (time.monotonic() - self._batch.started))

    def _shutdown(self) -> None:
        """Stop receiving, commit and acknowledge what was received, then return."""
        self._chan.stop_consuming()  # cancels both consumers; undispatched ones go back
        self._conn.process_data_events(time_limit=0)
        self._settle_rejected()
        self._count_consumed()
        self._flush()
        deadline = time.monotonic() + _SHUTDOWN_GRACE_S
        while self._in_flight and time.monotonic() < deadline:
            self._conn.process_data_events(time_limit=0.05)  # type: ignore[arg-type]
        if self._in_flight:
            log.warning("shutdown with batches not committed batches=%d", self._in_flight)
        self._metrics.maybe_log(force=True)

    # -- receiving -------------------------------------------------------------------------
    def _delivery(
        self, queue_name: str, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> Delivery:
        """The delivery with the routing key it was published under.

        A replayed dead letter comes back through the default exchange, with the routing key
        it was first published under in ``x-original-routing-key``. That header is taken only
        when the pipeline's signature over it, the queue and the body verifies: a node can
        write the header itself (as an MQTT 5 user property, or over AMQP), and a message the
        broker dead-lettered keeps it, so unsigned it would let one node's message be stored
        under another node's id. An unproved claim marks the delivery ``refused``.
        """
        routing_key = method.routing_key or ""
        headers = props.headers
        if method.exchange == "" and headers and ROUTING_KEY_HEADER in headers:
            claim = signed_claim(self._settings.dead_letter_key, headers, body)
            if claim is None or claim[1] != queue_name:
                reason = unsigned_claim_reason(
                    self._settings.dead_letter_key, headers, body, queue_name
                )
                return Delivery(
                    int(method.delivery_tag or 0), queue_name, routing_key, props, body, reason
                )
            routing_key = claim[0]
        return Delivery(int(method.delivery_tag or 0), queue_name, routing_key, props, body)

    def _on_reading(
        self, _ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        delivery = self._delivery(self._settings.readings_queue, method, props, body)
        self._consumed_readings += 1
        reading = self._decoded(delivery, decode_reading)
        if reading is not None:
            self._current_batch().add_reading(reading, delivery)

    def _on_status(
        self, _ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        delivery = self._delivery(self._settings.status_queue, method, props, body)
        self._consumed_statuses += 1
        status = self._decoded(delivery, decode_status)
        if status is not None:
            self._current_batch().add_status(status, delivery.tag)

    def _decoded(self, delivery: Delivery, decode: Callable[..., _T]) -> _T | None:
        """The decoded message, or None after queueing it for the dead-letter queue."""
        if delivery.refused is not None:
            self._rejected.append((delivery, delivery.refused))
            return None
        try:
            return decode(delivery.body, delivery.routing_key, now=self._now)
        except Rejected as exc:
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001 - a decoder bug: dead-letter, never die on input
            reason = _decoder_failed(exc)
        self._rejected.append((delivery, reason))
        return None

    def _current_batch(self) -> Batch:
        if self._batch is None:
            self._batch = Batch(session=self)
        return self._batch

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None or batch.size == 0:
            return
        self._in_flight += 1
        self._writer.submit(batch)

    # -- dead letters ----------------------------------------------------------------------
    def _settle_rejected(self) -> None:
        """Dead-letter each rejected delivery with its reason, then acknowledge it."""
        rejected, self._rejected = self._rejected, []
        for delivery, reason in rejected:
            if self._dead_letter(delivery, reason):
                self._chan.basic_ack(delivery.tag)

    def _dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Publish a copy into the dead-letter queue with the reason, and wait for the confirm.

        Returns True when the copy is safely queued and the caller must acknowledge the
        delivery. If the copy cannot be published, the delivery is rejected instead
        (``basic_nack(requeue=False)``), so the queue's dead-letter policy still keeps it (with
        ``x-death`` but without the reason, which is logged), and False is returned.
        """
        channel = self._chan
        dead_channel = self._dead_channel
        assert dead_channel is not None  # noqa: S101 - _chan checked it
        dead_queue = (
            self._settings.status_dead_queue
            if delivery.queue == self._settings.status_queue
            else self._settings.dead_queue
        )
        props = delivery.properties
        headers: dict[str, Any] = {
            k: v for k, v in (props.headers or {}).items() if k not in _COPY_DROP
        }
        rejected_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        headers.update(
            {
                REASON_HEADER: reason,
                ROUTING_KEY_HEADER: delivery.routing_key,
                QUEUE_HEADER: delivery.queue,
                REJECTED_AT_HEADER: rejected_at,
                REJECTED_BY_HEADER: f"pipeline {__version__}",
            }
        )
        key = self._settings.dead_letter_key
        if key is not None and delivery.refused is None:
            # Signed only when the routing key is the one the message was published under;
            # a refused replay's copy stays unsigned, so it is never replayed under any key.
            headers[SIGNATURE_HEADER] = sign(
                key,
                routing_key=delivery.routing_key,
                queue=delivery.queue,
                body=delivery.body,
                reason=reason,
                rejected_at=rejected_at,
            )
        copy = BasicProperties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            delivery_mode=2,  # persistent
            message_id=props.message_id or hashlib.sha256(delivery.body).hexdigest()[:32],
            timestamp=props.timestamp,
            headers=headers,
        )
        self._metrics.on_rejected(delivery.queue)
        try:
            dead_channel.basic_publish("", dead_queue, delivery.body, copy, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            log.error(  # noqa: TRY400 - the reason matters here, not pika's traceback
                "dead-letter copy refused, rejecting instead queue=%s reason=%s error=%s",
                dead_queue,
                reason,
                exc,
            )
            channel.basic_nack(delivery.tag, requeue=False)
            return False
        return True

    # -- acknowledgement (called from the writer thread) -----------------------------------
    def on_committed(self, batch: Batch, result: BatchResult) -> None:
        """Schedule the batch's acknowledgement on the AMQP thread."""
        connection = self._connection
        if connection is None or self.closed:
            return
        with contextlib.suppress(*_AMQP_ERRORS):
            connection.add_callback_threadsafe(lambda: self._acknowledge(batch, result))

    def _acknowledge(self, batch: Batch, result: BatchResult) -> None:
        self._in_flight -= 1
        if self._broken is not None or self._channel is None or not self._channel.is_open:
            return
        nacked: set[int] = set()
        for index, reason in result.refused:
            delivery = batch.reading_deliveries[index]
            if not self._dead_letter(delivery, reason):
                nacked.add(delivery.tag)
        # One ack settles the whole batch: every tag up to the highest one still outstanding
        # (rejected deliveries were settled already, and lower tags belong to earlier batches,
        # which committed first).
        remaining = [tag for tag in batch.tags if tag not in nacked] if nacked else batch.tags
        if remaining:
            self._channel.basic_ack(max(remaining), multiple=True)


def _decoder_failed(exc: Exception) -> str:
    log.error("the decoder failed on a message; it is dead-lettered", exc_info=exc)
    return f"decoder failed: {type(exc).__name__}: {str(exc)[:200]}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def consume_forever(
    settings: ConsumerSettings,
    store: Store,
    stop: threading.Event,
    *,
    on_session: Callable[[Session], None] | None = None,
) -> None:
    """Run sessions until ``stop`` is set, reconnecting with capped, jittered back-off.

    Returns after an orderly shutdown: the last batch committed and acknowledged (or, if the
    database stayed down, left unacknowledged for redelivery).
    """
    if settings.dead_letter_key is None:
        log.warning(
            "no key to sign dead letters (no AMQP password and no PIPELINE_DEAD_LETTER_KEY): "
            "`pipeline dead replay` can put back only what the broker recorded itself"
        )
    metrics = Metrics(interval_s=settings.log_interval_s)
    writer = Writer(store, metrics)
    writer.start()
    backoff = Backoff()
    attempt = 0
    try:
        while not stop.is_set():
            started = time.monotonic()
            session = Session(settings, writer, metrics, stop)
            if on_session is not None:
                on_session(session)
            try:
                session.run()
                attempt = 0
            except _SESSION_ENDED as exc:
                attempt += 1
                if time.monotonic() - started > 60:
                    backoff.reset()
                    attempt = 1
                delay = backoff.next()
                log.warning(
                    "broker connection lost or refused attempt=%d retry_in_s=%.1f url=%s error=%s",
                    attempt,
                    delay,
                    redact(settings.rabbitmq_url),
                    _first_line(exc) or type(exc).__name__,
                )
                stop.wait(delay)
    finally:
        writer.stop()
        writer.join(30)
