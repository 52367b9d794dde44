"""`pipeline consume`: the readings and node-status queues into PostgreSQL, exactly once.

Two threads share the work so that the database round trip overlaps the broker's:

* the AMQP thread (the caller of :func:`consume_forever`) owns the connection: it receives
  deliveries, decodes them, dead-letters what cannot be used, groups the rest into batches (by
  size or age, whichever comes first) and, when a batch has committed, acknowledges it with one
  ``basic_ack(multiple=True)``;
* dead-letter copies are published with publisher confirms, but without waiting for each
  confirm (pipeline.deadletters.DeadLetterPublisher): the copies of a loop turn go out
  together, and the broker's confirms (one frame can confirm many) settle them. A delivery is
  acknowledged only once its copy is confirmed, and a multiple ack never reaches past a
  delivery that is not settled yet (:class:`_Settlement`), so a flood of unusable messages
  costs the consumer about what decoding them costs;
* the writer thread commits batches in order, one transaction each, and retries a batch while
  the database is unreachable: nothing is acknowledged meanwhile, so the broker keeps the
  messages and stops sending once the prefetch window is full.

A crash anywhere before the acknowledgement means redelivery, and the natural key makes the
second insert a no-op. The reconnect loop (:func:`consume_forever`) is separate from the
session (:class:`Session`), which owns one connection and ends when it drops. With the nodes
of a cluster in RABBITMQ_URL, a session lost on one node is followed at once by a session on
another (pipeline.brokers); what the lost session had not acknowledged is redelivered there.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import heapq
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import pika
import pika.exceptions
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pipeline.brokers import connect
from pipeline.config import ConsumerSettings, redact
from pipeline.deadletters import DeadLetterPublisher, Delivery
from pipeline.decode import NodeStatus, Reading, decode_reading, decode_status
from pipeline.errors import Rejected, SessionBrokenError
from pipeline.frames import DeliveryCallback, DeliveryFrames
from pipeline.metrics import BROKER_UP, DATABASE_UP, Metrics
from pipeline.origin import signed_claim, unsigned_claim_reason
from pipeline.store import BatchResult, Store
from tempmon_contract.deadletter import ROUTING_KEY_HEADER
from tempmon_contract.retry import Backoff

__all__ = [
    "GC_THRESHOLDS",
    "Backoff",
    "Batch",
    "Reconnects",
    "Session",
    "SessionBrokenError",
    "Writer",
    "consume_forever",
    "tune_collector",
]

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
# The consumer tags the session consumes with (shown in the management UI's consumer list).
_READINGS_TAG = "tempmon-pipeline.readings"
_STATUS_TAG = "tempmon-pipeline.status"


# Everything that ends a session and sends the outer loop to reconnect.
_SESSION_ENDED: tuple[type[BaseException], ...] = (*_AMQP_ERRORS, SessionBrokenError)


class Reconnects:
    """When to connect again after a session ended, and which node to try last then.

    A session that was consuming and is lost is followed at once by the next attempt, which
    tries the lost node last (pipeline.brokers.connect): a consumer whose node died consumes
    from a survivor within seconds. That happens at most once per listed node between two
    sessions that lasted :attr:`HEALTHY_S`; otherwise (a whole round of nodes refused, a
    session ended before it consumed, sessions keep being lost) the capped, jittered back-off
    applies, so nothing reconnects in a tight loop.
    """

    HEALTHY_S: Final = 60.0

    def __init__(self, nodes: int, backoff: Backoff | None = None) -> None:
        self._nodes = nodes
        self._backoff = backoff or Backoff(0.5, 30.0)
        self.attempt = 0  # back-off waits since the last healthy session
        self.failovers = 0  # immediate reconnects since the last healthy session
        self.lost: str | None = None  # the node the last session was on: tried last

    def ended(self, *, node: str | None, consuming: bool, lasted_s: float) -> float | None:
        """A session ended: None to connect again at once, else the seconds to wait first.

        Args:
            node: the URL the session connected to (None: no node accepted).
            consuming: whether the session got as far as consuming.
            lasted_s: how long the session (its connection attempts included) took.
        """
        if lasted_s > self.HEALTHY_S:
            self._backoff.reset()
            self.attempt = self.failovers = 0
        if node is not None:
            self.lost = node
        if consuming and self.failovers < self._nodes:
            self.failovers += 1
            return None
        self.attempt += 1
        return self._backoff.next()


@dataclass
class Batch:
    """Deliveries that will be committed in one transaction and acknowledged together."""

    session: Session
    started: float = field(default_factory=time.monotonic)
    readings: list[Reading] = field(default_factory=list)
    reading_deliveries: list[Delivery] = field(default_factory=list)
    statuses: list[NodeStatus] = field(default_factory=list)
    status_deliveries: list[Delivery] = field(default_factory=list)
    tags: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.tags)

    def add_reading(self, reading: Reading, delivery: Delivery) -> None:
        self.readings.append(reading)
        self.reading_deliveries.append(delivery)
        self.tags.append(delivery.tag)

    def add_status(self, status: NodeStatus, delivery: Delivery) -> None:
        self.statuses.append(status)
        self.status_deliveries.append(delivery)
        self.tags.append(delivery.tag)


class Writer:
    """Commits the batches it is handed, on ``workers`` connections; never drops one on its own.

    Each worker thread takes the next batch and commits it on its own connection, so while one
    batch waits for PostgreSQL the next one is already being written: the database's work, the
    larger part of a batch, runs on two cores instead of one (bench/RESULTS.md, issue 17).
    Batches may therefore commit out of order; nothing depends on their order: the natural key
    keeps each reading once, the rollups are sums, the latest reading and node statuses are
    guarded by time and session (pipeline.store), and the session acknowledges a delivery only
    when every batch before it has committed (:class:`_Settlement`). With ``workers=1`` batches
    commit strictly in order.

    While the database is unreachable a worker retries its batch with back-off. When
    :meth:`stop` is called, the workers finish what they have, giving up on a batch they still
    cannot commit after ``grace_s`` (that batch is then simply not acknowledged: redelivery).

    A commit that neither succeeds nor fails (a database that stopped answering on an open
    connection) is reported by :meth:`check_stalled`, which the AMQP thread calls every turn:
    after ``stall_after_s`` it logs an error and sets ``pipeline_database_up`` to 0 until the
    commit returns. The connection's own timeouts (pipeline.db) end such a commit in the end.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        grace_s: float = 20.0,
        stall_after_s: float = 60.0,
        workers: int = 2,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers: {workers}, expected at least 1")
        self._store = store
        self._metrics = metrics
        self._grace_s = grace_s
        self._stall_after_s = stall_after_s
        self._queue: queue.Queue[Batch | None] = queue.Queue()
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")
        # When each worker's commit in progress began (None: idle). Each worker writes only
        # its own slot, the AMQP thread reads a copy: no dict that changes size under a reader.
        self._busy_since: list[float | None] = [None] * workers
        self._stall_reported: float | None = None  # the start a stall was reported for
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"pipeline-writer-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def check_stalled(self) -> None:
        """Report a commit that has waited longer than ``stall_after_s`` (once per commit)."""
        began = min((b for b in self._busy_since.copy() if b is not None), default=None)
        if began is None or began == self._stall_reported:
            return
        waited = time.monotonic() - began
        if waited < self._stall_after_s:
            return
        self._stall_reported = began
        DATABASE_UP.set(0)
        log.error(
            "database not answering: a commit has waited %.0f s, longer than the database "
            "timeouts allow (%g s); nothing is acknowledged meanwhile, the broker keeps the "
            "messages; check the database host and the network path to it",
            waited,
            self._stall_after_s,
        )

    def submit(self, batch: Batch) -> None:
        self._queue.put(batch)

    def stop(self) -> None:
        """Finish the queued batches (or give up after the grace period), then end."""
        self._stop_deadline = time.monotonic() + self._grace_s
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)

    def _run(self, worker: int) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                result = self._commit(batch, worker)
                if result is not None:
                    batch.session.on_committed(batch, result)
            except Exception:
                # A bug must not kill the thread silently, and the batch must not be
                # acknowledged by a later batch's multiple ack: end the session, so every
                # unacknowledged delivery is redelivered.
                log.exception("writer failed on a batch; ending the session for redelivery")
                batch.session.fail("the writer failed on a batch")

    def _commit(self, batch: Batch, worker: int) -> BatchResult | None:
        backoff = Backoff(0.2, 10.0)
        failures = 0
        while True:
            began = time.monotonic()
            self._busy_since[worker] = began
            try:
                result = self._store.write(batch.readings, batch.statuses)
            except (DBAPIError, SQLAlchemyError) as exc:
                self._busy_since[worker] = None
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
            finally:
                self._busy_since[worker] = None
            DATABASE_UP.set(1)
            if self._stall_reported == began:
                log.info("database answered again after %.0f s", time.monotonic() - began)
            if failures:
                log.info("database reachable again after failures=%d", failures)
            self._metrics.on_batch(
                batch.size,
                result.inserted,
                result.duplicates,
                result.statuses,
                time.monotonic() - began,
                conflicts=result.conflicts,
            )
            return result


class _Settlement:
    """Which deliveries one ``basic_ack(multiple=True)`` may settle.

    Delivery tags grow in delivery order. A delivery is unsettled while it is in a batch that
    has not committed, or while its dead-letter copy waits for the broker's confirm; such a
    delivery must never be acknowledged by a multiple ack meant for later ones. This keeps the
    highest tag that is ready (committed, or its copy confirmed) and the tags still waiting for
    a confirm (a heap; a released tag leaves it lazily). Batches are the session's to track:
    they commit in order, so the oldest one holds the lowest unsettled batch tag.
    """

    __slots__ = ("_held", "_released", "acked", "ready")

    def __init__(self) -> None:
        self.acked = 0  # the highest tag acknowledged with multiple=True
        self.ready = 0  # the highest tag committed or confirmed
        self._held: list[int] = []
        self._released: set[int] = set()

    def hold(self, tag: int) -> None:
        """The delivery waits for its dead-letter copy's confirm."""
        heapq.heappush(self._held, tag)

    def release(self, tag: int, *, ready: bool) -> None:
        """The copy is settled: confirmed (``ready``: ack it) or nacked on its own already."""
        self._released.add(tag)
        if ready and tag > self.ready:
            self.ready = tag

    def bound(self, lowest_in_batches: int | None) -> int:
        """The highest tag that one multiple ack may settle now."""
        held = self._held
        while held and held[0] in self._released:
            self._released.discard(heapq.heappop(held))
        bound = self.ready
        if held and held[0] <= bound:
            bound = held[0] - 1
        if lowest_in_batches is not None and lowest_in_batches <= bound:
            bound = lowest_in_batches - 1
        return bound


class Session:
    """One AMQP connection consuming the readings and node-status queues.

    Ends (returns or raises) when the connection drops or a stop is requested. It connects to
    one of ``settings.rabbitmq_urls`` (pipeline.brokers.connect), ``lost`` last; ``node`` is
    the URL it connected to, ``consuming`` says whether it got as far as consuming.

    Deliveries arrive through pipeline.frames: its callbacks (:meth:`_receive_reading`,
    :meth:`_receive_status`) run whenever pika reads from the socket, which includes the
    I/O inside pika's blocking calls (an ack, a cancel), not only inside ``_loop``'s wait.
    So they only record: decode, add to the open batch, or queue a dead letter. Flushing,
    publishing and acknowledging happen in the loop's own steps.
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        writer: Writer,
        metrics: Metrics,
        stop: threading.Event,
        *,
        lost: str | None = None,
    ) -> None:
        self._settings = settings
        self._lost = lost
        self.node: str | None = None
        self.consuming = False
        self._writer = writer
        self._metrics = metrics
        self._stop = stop
        self._batch_age = settings.batch_ms / 1000
        self._connection: pika.BlockingConnection | None = None
        self._frames: DeliveryFrames | None = None
        self._channel: BlockingChannel | None = None
        self._dead_channel: BlockingChannel | None = None
        self._dead: DeadLetterPublisher | None = None
        self._batch: Batch | None = None
        self._batches: deque[Batch] = deque()  # handed to the writer, not yet acknowledged
        self._rejected: list[tuple[Delivery, str]] = []  # to dead-letter this turn
        self._settlement = _Settlement()
        # Counted here and handed to the metrics once per loop turn, not once per message.
        self._consumed_readings = 0
        self._consumed_statuses = 0
        self._rejected_readings = 0
        self._rejected_statuses = 0
        self.closed = False
        self._broken: str | None = None  # set by the writer thread; ends the session
        self._now = datetime.now(UTC)

    # -- the session -----------------------------------------------------------------------
    def run(self) -> None:
        """Consume until a stop is requested; raise an AMQP error if the connection drops."""
        self._connection, self.node = connect(
            self._settings.rabbitmq_urls,
            lost=self._lost,
            heartbeat=30,
            blocked_connection_timeout=300,
        )
        self._frames = DeliveryFrames.install(self._connection)
        _skip_callback_lookup_for_deliveries(self._connection)
        _coalesce_writes(self._connection)
        try:
            self._channel = self._connection.channel()
            self._channel.basic_qos(prefetch_count=self._settings.prefetch)
            self._dead_channel = self._connection.channel()
            self._dead = DeadLetterPublisher(self._dead_channel, self._connection, timeout_s=30)
            s = self._settings
            self._consume(s.readings_queue, _READINGS_TAG, self._on_reading, self._receive_reading)
            self._consume(s.status_queue, _STATUS_TAG, self._on_status, self._receive_status)
            BROKER_UP.set(1)
            self.consuming = True
            log.info(
                "consuming queues=%s,%s prefetch=%d batch_size=%d batch_ms=%d node=%s",
                s.readings_queue,
                s.status_queue,
                s.prefetch,
                s.batch_size,
                s.batch_ms,
                redact(self.node),
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

    def _consume(
        self,
        queue: str,
        tag: str,
        on_message: Callable[[BlockingChannel, Basic.Deliver, BasicProperties, bytes], None],
        receive: DeliveryCallback,
    ) -> None:
        """Consume ``queue``: through the fast frame path if installed, else pika's own."""
        if self._frames is not None:
            self._frames.register(self._chan.channel_number, tag, receive)
        self._chan.basic_consume(queue, on_message, consumer_tag=tag)

    def _process(self, time_limit: float) -> None:
        """One turn of pika's I/O: read, dispatch, run the writer thread's callbacks."""
        self._conn.process_data_events(time_limit=time_limit)  # type: ignore[arg-type]
        if self._frames is not None:
            self._frames.raise_error()

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
            self._process(self._wait_time())
            self._publish_rejected()
            self._apply_confirms()
            self._count_consumed()
            if self._batch is not None and (
                self._batch.size >= self._settings.batch_size
                or time.monotonic() - self._batch.started >= self._batch_age
            ):
                self._flush()
            self._writer.check_stalled()
            self._metrics.maybe_log()

    def _count_consumed(self) -> None:
        """Hand this turn's counts of consumed and dead-lettered messages to the metrics."""
        metrics, settings = self._metrics, self._settings
        if self._consumed_readings:
            metrics.on_consumed(settings.readings_queue, self._consumed_readings)
            self._consumed_readings = 0
        if self._consumed_statuses:
            metrics.on_consumed(settings.status_queue, self._consumed_statuses)
            self._consumed_statuses = 0
        if self._rejected_readings:
            metrics.on_rejected(settings.readings_queue, self._rejected_readings)
            self._rejected_readings = 0
        if self._rejected_statuses:
            metrics.on_rejected(settings.status_queue, self._rejected_statuses)
            self._rejected_statuses = 0

    def _wait_time(self) -> float:
        # Dead-letter confirms arrive without waking the loop: look for them soon.
        idle = 0.02 if self._dead is not None and self._dead.outstanding else 0.5
        if self._batch is None:
            return idle
        return max(0.0, min(idle, self._batch_age - (time.monotonic() - self._batch.started)))

    def _shutdown(self) -> None:
        """Stop receiving, commit and acknowledge what was received, then return."""
        self._chan.stop_consuming()  # cancels both consumers; undispatched ones go back
        self._process(0)
        self._publish_rejected()
        self._count_consumed()
        self._flush()
        deadline = time.monotonic() + _SHUTDOWN_GRACE_S
        while (self._batches or self._dead_outstanding()) and time.monotonic() < deadline:
            self._process(0.02)
            self._publish_rejected()
            self._apply_confirms()
        if self._batches or self._dead_outstanding():
            log.warning(
                "shutdown with batches not committed batches=%d dead_letters_unconfirmed=%d",
                len(self._batches),
                self._dead_outstanding(),
            )
        self._count_consumed()  # the copies published while waiting
        self._metrics.maybe_log(force=True)

    def _dead_outstanding(self) -> int:
        return self._dead.outstanding if self._dead is not None else 0

    # -- receiving -------------------------------------------------------------------------
    def _delivery(
        self,
        queue_name: str,
        tag: int,
        exchange: str,
        routing_key: str,
        *,
        props: BasicProperties,
        body: bytes,
    ) -> Delivery:
        """The delivery with the routing key it was published under.

        A replayed dead letter comes back through the default exchange, with the routing key
        it was first published under in ``x-original-routing-key``. That header is taken only
        when the pipeline's signature over it, the queue and the body verifies: a node can
        write the header itself (as an MQTT 5 user property, or over AMQP), and a message the
        broker dead-lettered keeps it, so unsigned it would let one node's message be stored
        under another node's id. An unproved claim marks the delivery ``refused``.
        """
        headers = props.headers
        if exchange == "" and headers and ROUTING_KEY_HEADER in headers:
            claim = signed_claim(self._settings.dead_letter_key, headers, body)
            if claim is None or claim[1] != queue_name:
                reason = unsigned_claim_reason(
                    self._settings.dead_letter_key, headers, body, queue_name
                )
                return Delivery(tag, queue_name, routing_key, props, body, reason)
            routing_key = claim[0]
        return Delivery(tag, queue_name, routing_key, props, body)

    def _on_reading(
        self, _ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        """A reading through pika's own dispatch (pipeline.frames not installed)."""
        tag = int(method.delivery_tag or 0)
        self._receive_reading(tag, _text(method.exchange), _text(method.routing_key), props, body)

    def _on_status(
        self, _ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        """A node status through pika's own dispatch (pipeline.frames not installed)."""
        tag = int(method.delivery_tag or 0)
        self._receive_status(tag, _text(method.exchange), _text(method.routing_key), props, body)

    def _receive_reading(
        self, tag: int, exchange: str, routing_key: str, props: BasicProperties, body: bytes
    ) -> None:
        delivery = self._delivery(
            self._settings.readings_queue, tag, exchange, routing_key, props=props, body=body
        )
        self._consumed_readings += 1
        reading = self._decoded(delivery, decode_reading)
        if reading is not None:
            self._current_batch().add_reading(reading, delivery)

    def _receive_status(
        self, tag: int, exchange: str, routing_key: str, props: BasicProperties, body: bytes
    ) -> None:
        delivery = self._delivery(
            self._settings.status_queue, tag, exchange, routing_key, props=props, body=body
        )
        self._consumed_statuses += 1
        status = self._decoded(delivery, decode_status)
        if status is not None:
            self._current_batch().add_status(status, delivery)

    def _decoded(self, delivery: Delivery, decode: Callable[..., _T]) -> _T | None:
        """The decoded message, or None after queueing it for the dead-letter queue."""
        if delivery.refused is not None:
            self._reject(delivery, delivery.refused)
            return None
        try:
            return decode(delivery.body, delivery.routing_key, now=self._now)
        except Rejected as exc:
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001 - a decoder bug: dead-letter, never die on input
            reason = _decoder_failed(exc)
        self._reject(delivery, reason)
        return None

    def _current_batch(self) -> Batch:
        if self._batch is None:
            self._batch = Batch(session=self)
        return self._batch

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None or batch.size == 0:
            return
        self._batches.append(batch)
        self._writer.submit(batch)

    # -- dead letters ----------------------------------------------------------------------
    def _reject(self, delivery: Delivery, reason: str) -> None:
        """Queue a delivery for the dead-letter queue; it stays unacknowledged until then."""
        self._settlement.hold(delivery.tag)
        self._rejected.append((delivery, reason))

    def _publish_rejected(self) -> None:
        """Publish the dead-letter copies queued this turn; their confirms come later."""
        if not self._rejected:
            return
        rejected, self._rejected = self._rejected, []
        for delivery, reason in rejected:
            self._dead_letter(delivery, reason)

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish a copy into the dead-letter queue with the reason (confirmed later).

        When the broker confirms the copy, :meth:`_apply_confirms` acknowledges the delivery;
        if it refuses it, the delivery is rejected instead (pipeline.deadletters).
        """
        dead = self._dead
        assert dead is not None  # noqa: S101 - set up before any delivery
        if delivery.queue == self._settings.status_queue:
            dead_queue = self._settings.status_dead_queue
            self._rejected_statuses += 1
        else:
            dead_queue = self._settings.dead_queue
            self._rejected_readings += 1
        dead.dead_letter(delivery, reason, dead_queue, key=self._settings.dead_letter_key)

    def _apply_confirms(self) -> None:
        """Settle the deliveries whose copies the broker confirmed (or refused) meanwhile."""
        if self._dead is None:
            return
        settled = self._dead.settle(self._chan)
        if not settled:
            return
        for tag, ready in settled:
            self._settlement.release(tag, ready=ready)
        self._ack_ready()

    def _ack_ready(self) -> None:
        """Acknowledge, with one multiple ack, everything up to the first unsettled delivery."""
        if self._batches:
            lowest: int | None = self._batches[0].tags[0]
        elif self._batch is not None and self._batch.tags:
            lowest = self._batch.tags[0]
        else:
            lowest = None
        settlement = self._settlement
        bound = settlement.bound(lowest)
        if bound > settlement.acked:
            self._chan.basic_ack(bound, multiple=True)
            settlement.acked = bound

    # -- acknowledgement (called from the writer thread) -----------------------------------
    def on_committed(self, batch: Batch, result: BatchResult) -> None:
        """Schedule the batch's acknowledgement on the AMQP thread."""
        connection = self._connection
        if connection is None or self.closed:
            return
        with contextlib.suppress(*_AMQP_ERRORS):
            connection.add_callback_threadsafe(lambda: self._acknowledge(batch, result))

    def _acknowledge(self, batch: Batch, result: BatchResult) -> None:
        """The batch committed: dead-letter what the database refused, acknowledge the rest.

        Batches may commit out of order (the writer has more than one connection): the
        multiple ack reaches only up to the oldest batch still uncommitted (:meth:`_ack_ready`).
        """
        if self._batches and self._batches[0] is batch:
            self._batches.popleft()
        else:
            with contextlib.suppress(ValueError):
                self._batches.remove(batch)
        if self._broken is not None or self._channel is None or not self._channel.is_open:
            return
        for index, reason in result.refused:
            self._reject(batch.reading_deliveries[index], reason)
        for index, reason in result.refused_statuses:
            self._reject(batch.status_deliveries[index], reason)
        self._settlement.ready = max(self._settlement.ready, batch.tags[-1])
        self._publish_rejected()
        self._ack_ready()


def _skip_callback_lookup_for_deliveries(connection: pika.BlockingConnection) -> None:
    """Spare pika a callback-registry lookup for every delivery.

    pika looks up every inbound method frame in its CallbackManager before handing it to the
    channel; the lookup normalises its keys through two decorators and cost about 7 % of the
    consumer's time (bench/RESULTS.md, issue 17). A ``Basic.Deliver`` never has a registered
    callback there (pika routes it to the channel's content assembler), and header and body
    frames are not method frames, so for those the answer is known: "no callback". Every other
    frame goes through pika's own lookup. pika is pinned (constraints.txt); if a version lacks
    the method, nothing is changed (tests/system/test_pika_fast_path.py).
    """
    impl: Any = getattr(connection, "_impl", None)
    original = getattr(impl, "_process_callbacks", None)
    if original is None:
        return
    method_frame, deliver = pika.frame.Method, Basic.Deliver

    def process_callbacks(frame_value: pika.frame.Frame) -> bool:
        if type(frame_value) is not method_frame or type(frame_value.method) is deliver:
            return False
        return bool(original(frame_value))

    impl._process_callbacks = process_callbacks


def _coalesce_writes(connection: pika.BlockingConnection) -> None:
    """Send what pika has buffered in one ``send()`` instead of one per frame.

    pika buffers each frame it writes as its own chunk and sends the chunks one at a time: a
    dead-letter copy is three frames (method, header, body), so three system calls and three
    TCP segments for the broker to read, and an ack one more. Joining the buffered chunks
    before pika's own send loop keeps the bytes and their order and leaves partial sends and
    errors to pika. If the pinned pika's transport lacks these attributes, nothing is changed
    (tests/system/test_pika_fast_path.py).
    """
    transport: Any = getattr(getattr(connection, "_impl", None), "_transport", None)
    produce = getattr(transport, "_produce", None)
    buffers = getattr(transport, "_tx_buffers", None)
    if produce is None or not isinstance(buffers, collections.deque):
        return

    def coalesced() -> None:
        if len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)
        produce()

    transport._produce = coalesced


def _text(value: str | bytes | None) -> str:
    """A short string of a delivery as text: pika hands one that is not UTF-8 over as bytes.
    Any AMQP publisher can send such a routing key; shown with backslash escapes (as
    pipeline.frames reads it), it is no node's id and gets dead-lettered."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value or ""


def _decoder_failed(exc: Exception) -> str:
    log.error("the decoder failed on a message; it is dead-lettered", exc_info=exc)
    return f"decoder failed: {type(exc).__name__}: {str(exc)[:200]}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# The cyclic collector's thresholds for `pipeline consume` (gc.set_threshold): a young
# collection after this many container allocations, not Python's 700; an older generation after
# this many collections of the younger one. See :func:`tune_collector`.
GC_THRESHOLDS: Final = (50_000, 20, 10)


def tune_collector() -> None:
    """Make Python's cyclic garbage collector cheap for a long-running consumer process.

    With Python's defaults, the consumer collected its youngest generation every 700 container
    allocations (a few hundred messages) and its oldest about once a second; each full
    collection walked every object the imports had made (pika, SQLAlchemy, psycopg, the
    metrics) and took 25-50 ms with the GIL held, stalling the AMQP and writer threads alike
    (measured: about 5 % of the clean drain's time, 10 % of the hostile run's, where each
    ``[`` * 500 payload allocates 500 lists). This collects once, freezes what the start-up
    made (gc.freeze: the collector never walks it again) and raises the thresholds
    (:data:`GC_THRESHOLDS`); reference counting still frees almost everything at once, and
    the collector still runs, on far fewer, younger objects.

    For the process's entry point (``pipeline consume``), called once after start-up:
    freezing is process-wide.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info(
        "garbage collector tuned frozen_objects=%d thresholds=%s",
        gc.get_freeze_count(),
        "/".join(map(str, GC_THRESHOLDS)),
    )


def consume_forever(
    settings: ConsumerSettings,
    store: Store,
    stop: threading.Event,
    *,
    on_session: Callable[[Session], None] | None = None,
) -> None:
    """Run sessions until ``stop`` is set, reconnecting with capped, jittered back-off.

    A session that was consuming and is lost is followed at once by a new connection attempt
    that tries the other nodes first; the back-off applies only when that does not help
    (:class:`Reconnects`).

    Returns after an orderly shutdown: the last batch committed and acknowledged (or, if the
    database stayed down, left unacknowledged for redelivery).
    """
    if settings.dead_letter_key is None:
        log.warning(
            "no key to sign dead letters (no AMQP password and no PIPELINE_DEAD_LETTER_KEY): "
            "`pipeline dead replay` can put back only what the broker recorded itself"
        )
    metrics = Metrics(interval_s=settings.log_interval_s)
    # The connection's timeouts end a stuck commit; past them (and a margin) it is a stall.
    stall_after_s = (
        max(settings.db_statement_timeout_s, settings.db_tcp_timeout_s)
        + settings.db_connect_timeout_s
        + 20
    )
    writer = Writer(store, metrics, stall_after_s=stall_after_s, workers=settings.db_writers)
    writer.start()
    reconnects = Reconnects(len(settings.rabbitmq_urls))
    try:
        while not stop.is_set():
            started = time.monotonic()
            session = Session(settings, writer, metrics, stop, lost=reconnects.lost)
            if on_session is not None:
                on_session(session)
            try:
                session.run()
            except _SESSION_ENDED as exc:
                lasted = time.monotonic() - started
                error = _first_line(exc) or type(exc).__name__
                delay = reconnects.ended(
                    node=session.node, consuming=session.consuming, lasted_s=lasted
                )
                if delay is None:
                    log.warning(
                        "broker connection lost node=%s after_s=%.1f error=%s; reconnecting now%s",
                        redact(session.node or ""),
                        lasted,
                        error,
                        ", other nodes first" if len(settings.rabbitmq_urls) > 1 else "",
                    )
                    continue
                log.warning(
                    "broker connection lost or refused attempt=%d retry_in_s=%.1f node=%s error=%s",
                    reconnects.attempt,
                    delay,
                    redact(session.node) if session.node else _nodes(settings.rabbitmq_urls),
                    error,
                )
                stop.wait(delay)
    finally:
        writer.stop()
        writer.join(30)
        if not writer.is_alive():
            store.close()  # the writer's held connection back to the pool


def _nodes(urls: tuple[str, ...]) -> str:
    """The nodes of a failed round, for a log line: the URL, or how many there are."""
    return redact(urls[0]) if len(urls) == 1 else f"none-of-{len(urls)}"
