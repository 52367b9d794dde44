"""The consumer's acknowledgement ledger and its dead-letter publisher, without a broker.

A flood of unusable messages used to cost one publisher-confirm round trip each (the blocking
channel waits for every confirm). Now the copies go out together and are confirmed later, so
the one rule that matters is checked here: a ``basic_ack(multiple=True)`` never settles a
delivery whose batch has not committed or whose dead-letter copy is not confirmed.
The dead-letter copy's headers (pipeline.deadletters.copy_properties) and the fallback when the
broker refuses a copy (DeadLetterPublisher.settle) are checked here too.
The system tests (test_pipeline.py, test_hostile_input.py) run the same code against RabbitMQ.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from pika.spec import Basic, BasicProperties

from pipeline import __version__
from pipeline.consumer import _Settlement
from pipeline.deadletters import DeadLetterPublisher, Delivery, copy_properties
from pipeline.origin import BrokerInfo, establish, signed_claim
from tempmon_contract import deadletter


def _delivery(tag: int, body: bytes = b"x") -> Delivery:
    return Delivery(tag, "readings", "sensors.a.b", BasicProperties(), body)


def test_nothing_is_ready_nothing_is_acknowledged() -> None:
    assert _Settlement().bound(None) == 0


def test_a_held_copy_stops_the_multiple_ack_below_it() -> None:
    s = _Settlement()
    s.hold(3)
    s.ready = 10  # a batch with tags up to 10 committed
    assert s.bound(None) == 2
    s.release(3, ready=True)
    assert s.bound(None) == 10


def test_an_uncommitted_batch_stops_the_multiple_ack_below_it() -> None:
    s = _Settlement()
    s.hold(5)
    s.release(5, ready=True)  # a confirmed copy with tag 5 ...
    assert s.bound(lowest_in_batches=2) == 1  # ... but tags 2-4 wait in a batch


def test_a_nacked_copy_is_settled_but_not_ready() -> None:
    s = _Settlement()
    s.hold(4)
    s.release(4, ready=False)
    assert s.bound(None) == 0  # nothing was ready: no ack at all
    s.ready = 9
    assert s.bound(None) == 9  # a multiple ack may pass a delivery nacked on its own


def _model_check(seed: int) -> None:
    """Random interleavings against a brute-force model of what may be acknowledged."""
    rng = random.Random(seed)
    s = _Settlement()
    state: dict[int, str] = {}  # tag -> batch | held | ready | nacked
    batches: list[list[int]] = []  # in order, uncommitted
    open_batch: list[int] = []
    tag = 0
    for _ in range(400):
        step = rng.random()
        if step < 0.5:
            tag += 1
            if rng.random() < 0.2:
                state[tag] = "held"
                s.hold(tag)
            else:
                state[tag] = "batch"
                open_batch.append(tag)
        elif step < 0.65 and open_batch:
            batches.append(open_batch)
            open_batch = []
        elif step < 0.8 and batches:
            committed = batches.pop(0)
            for t in committed:
                state[t] = "ready"
            s.ready = max(s.ready, committed[-1])
        else:
            held = [t for t, st in state.items() if st == "held"]
            if held:
                t = rng.choice(held)
                ok = rng.random() < 0.9
                state[t] = "ready" if ok else "nacked"
                s.release(t, ready=ok)
        lowest = batches[0][0] if batches else (open_batch[0] if open_batch else None)
        bound = s.bound(lowest)
        # Every tag up to the bound is settled, and the bound is as high as it can be.
        assert all(state[t] in ("ready", "nacked") for t in range(1, bound + 1))
        unsettled = [t for t, st in state.items() if st in ("batch", "held")]
        ready = [t for t, st in state.items() if st == "ready"]
        best = min([*unsettled, (max(ready) if ready else 0) + 1]) - 1
        best = min(best, max(ready) if ready else 0)
        assert bound == best
        s.acked = max(s.acked, bound)


@pytest.mark.parametrize("seed", range(20))
def test_the_bound_matches_a_brute_force_model(seed: int) -> None:
    _model_check(seed)


class _FakeImpl:
    """The few calls the publisher makes on pika's underlying channel."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, Any]] = []
        self.on_return: Callable[..., None] | None = None
        self.on_confirm: Callable[..., None] | None = None

    def add_on_return_callback(self, callback: Callable[..., None]) -> None:
        self.on_return = callback

    def confirm_delivery(
        self, ack_nack_callback: Callable[..., None], callback: Callable[[Any], None]
    ) -> None:
        self.on_confirm = ack_nack_callback
        callback(None)  # Confirm.SelectOk at once

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool
    ) -> None:
        assert exchange == ""
        assert mandatory
        self.published.append((routing_key, body, properties))


class _Frame:
    def __init__(self, method: Any) -> None:
        self.method = method


def _publisher() -> tuple[DeadLetterPublisher, _FakeImpl]:
    impl = _FakeImpl()

    class _Channel:
        _impl = impl

    publisher = DeadLetterPublisher(_Channel(), None, timeout_s=1)  # type: ignore[arg-type]
    return publisher, impl


def test_copies_go_out_without_waiting_and_one_multiple_ack_settles_them() -> None:
    publisher, impl = _publisher()
    for tag in (7, 9, 12):
        publisher.publish(_delivery(tag), "readings.dead", BasicProperties(message_id=f"m{tag}"))
    assert len(impl.published) == 3  # all three sent before any confirm
    assert publisher.outstanding == 3
    assert publisher.settled() == []
    assert impl.on_confirm is not None
    impl.on_confirm(_Frame(Basic.Ack(delivery_tag=2, multiple=True)))
    assert [(d.tag, f) for d, f in publisher.settled()] == [(7, None), (9, None)]
    impl.on_confirm(_Frame(Basic.Nack(delivery_tag=3, multiple=False)))
    [(delivery, failure)] = publisher.settled()
    assert delivery.tag == 12
    assert failure is not None
    assert "nack" in failure
    assert publisher.outstanding == 0


def test_a_returned_copy_is_a_failure_even_when_acknowledged() -> None:
    publisher, impl = _publisher()
    publisher.publish(_delivery(1, b"a"), "gone", BasicProperties(message_id="m1"))
    publisher.publish(_delivery(2, b"b"), "readings.dead", BasicProperties(message_id="m2"))
    assert impl.on_return is not None
    assert impl.on_confirm is not None
    # The broker returns an unroutable mandatory message, then confirms it with an ack.
    impl.on_return(None, Basic.Return(), BasicProperties(message_id="m1"), b"a")
    impl.on_confirm(_Frame(Basic.Ack(delivery_tag=2, multiple=True)))
    settled = {d.tag: f for d, f in publisher.settled()}
    assert settled[2] is None
    assert settled[1] is not None
    assert "return" in settled[1]


class _ConsumerChannel:
    """The channel the originals were consumed on: records rejections."""

    def __init__(self) -> None:
        self.nacked: list[tuple[int, bool]] = []

    def basic_nack(self, delivery_tag: int, requeue: bool) -> None:
        self.nacked.append((delivery_tag, requeue))


def test_settle_rejects_a_refused_copys_original_and_reports_the_rest_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher, impl = _publisher()
    publisher.dead_letter(
        _delivery(4, b"a"), "temperature_c: 130.5 is outside", "readings.dead", key=None
    )
    publisher.dead_letter(_delivery(6, b"b"), "seq: missing", "readings.dead", key=None)
    assert impl.on_confirm is not None
    impl.on_confirm(_Frame(Basic.Nack(delivery_tag=1, multiple=False)))
    impl.on_confirm(_Frame(Basic.Ack(delivery_tag=2, multiple=False)))
    channel = _ConsumerChannel()
    with caplog.at_level("ERROR"):
        assert publisher.settle(channel) == [(4, False), (6, True)]  # type: ignore[arg-type]
    assert channel.nacked == [(4, False)]  # rejected, not requeued: the queue's DLX keeps it
    [record] = caplog.records
    assert "rejecting instead" in record.getMessage()
    assert "temperature_c: 130.5 is outside" in record.getMessage()  # the reason is not lost
    assert publisher.settle(channel) == []  # type: ignore[arg-type]


NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY = b"k" * 32


def test_a_copy_carries_the_reason_and_the_signed_origin() -> None:
    original = BasicProperties(
        content_type="application/json",
        message_id="m-1",
        headers={
            "x-death": [{"queue": "readings"}],
            "x-delivery-count": 3,
            "mine": "kept",
            deadletter.SIGNATURE_HEADER: "v1:forged:0",
        },
    )
    delivery = Delivery(5, "readings", "sensors.pi-01.t1", original, b'{"x":1}')
    copy = copy_properties(delivery, "seq: missing", key=KEY, now=NOW)
    headers = copy.headers
    assert headers is not None
    assert headers["mine"] == "kept"
    assert not headers.keys() & deadletter.BROKER_DEATH_HEADERS  # a publisher's, never carried
    assert headers[deadletter.REASON_HEADER] == "seq: missing"
    assert headers[deadletter.ROUTING_KEY_HEADER] == "sensors.pi-01.t1"
    assert headers[deadletter.QUEUE_HEADER] == "readings"
    assert headers[deadletter.REJECTED_AT_HEADER] == "2025-06-01T12:00:00.000+00:00"
    assert headers[deadletter.REJECTED_BY_HEADER] == f"pipeline {__version__}"
    assert (copy.delivery_mode, copy.message_id, copy.content_type) == (
        2,
        "m-1",
        "application/json",
    )
    # The new signature (not the forged one) proves the origin to `pipeline dead list`.
    assert signed_claim(KEY, headers, delivery.body) == ("sensors.pi-01.t1", "readings")
    origin = establish(
        headers,
        delivery.body,
        key=KEY,
        broker=BrokerInfo("RabbitMQ", "4.0.5"),
        source_queue="readings",
    )
    assert origin.source == "signed"


def test_a_refused_replays_copy_stays_unsigned_and_gets_a_message_id() -> None:
    delivery = Delivery(
        5,
        "readings",
        "sensors.pi-01.t1",
        BasicProperties(),
        b"body",
        refused="x-original-routing-key: 'sensors.pi-02.t1' is not proved",
    )
    copy = copy_properties(delivery, delivery.refused or "", key=KEY, now=NOW)
    assert copy.headers is not None
    assert deadletter.SIGNATURE_HEADER not in copy.headers
    assert signed_claim(KEY, copy.headers, delivery.body) is None
    assert copy.message_id is not None
    assert len(copy.message_id) == 32  # the body's hash stands in for a missing id
    assert copy_properties(delivery, "r", key=None, now=NOW).message_id == copy.message_id
