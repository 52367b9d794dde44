"""pipeline.frames reads deliveries exactly as pika would and leaves every other frame to pika.

The streams are made of pika's own marshalled frames; what the fast path hands to its callbacks
is held to what pika's own decoder makes of the same bytes, for any split of the stream into
reads. What it does not read (other frames, other consumers, anything unexpected) must reach
pika's handler whole, in order, and byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pika.exceptions
import pika.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika import spec
from pika.spec import BasicProperties

from pipeline.frames import MAX_HELD_BYTES, RECV_BYTES, DeliveryFrames

READINGS = 1
DEAD = 2
TAG = "tempmon-pipeline.readings"


@dataclass
class FakeImpl:
    """The part of pika's Connection the fast path touches; its handler decodes with pika."""

    _frame_buffer: bytes = b""
    bytes_received: int = 0
    frames_received: int = 0
    handed: list[bytes] = field(default_factory=list)

    def _on_data_available(self, data: bytes) -> None:
        self.handed.append(data)
        self.bytes_received += len(data)
        self.frames_received += len(frames_of(data))


@dataclass
class FakeConnection:
    """A BlockingConnection's part: its impl, and the request that ends a wait for events."""

    _impl: Any
    wakes: list[int] = field(default_factory=list)

    def _request_channel_dispatch(self, channel_number: int) -> None:
        self.wakes.append(channel_number)


def frames_of(data: bytes) -> list[Any]:
    """pika's own decoding of whole frames."""
    out = []
    while data:
        used, value = pika.frame.decode_frame(data)
        assert value is not None, "a partial frame was handed to pika"
        out.append(value)
        data = data[used:]
    return out


def deliver(
    tag: int,
    body: bytes,
    props: BasicProperties | None = None,
    *,
    channel: int = READINGS,
    consumer: str = TAG,
    routing_key: str = "sensors.n1.s1",
    frame_max: int = 4096,
) -> bytes:
    method = spec.Basic.Deliver(
        consumer_tag=consumer,
        delivery_tag=tag,
        redelivered=tag % 2 == 0,
        exchange="amq.topic",
        routing_key=routing_key,
    )
    out = [
        pika.frame.Method(channel, method).marshal(),
        pika.frame.Header(channel, len(body), props or BasicProperties()).marshal(),
    ]
    out.extend(
        pika.frame.Body(channel, body[start : start + frame_max]).marshal()
        for start in range(0, len(body), frame_max)
    )
    return b"".join(out)


def confirm(tag: int) -> bytes:
    return pika.frame.Method(DEAD, spec.Basic.Ack(delivery_tag=tag)).marshal()


HEARTBEAT = pika.frame.Heartbeat().marshal()

PROPS = [
    None,
    BasicProperties(delivery_mode=2),
    BasicProperties(headers={"x-mqtt-publish-qos": 1, "x-mqtt-dup": False}, delivery_mode=2),
    BasicProperties(
        content_type="application/json",
        headers={"nested": {"a": [1, "two", b"three"]}, "n": -5},
        message_id="m-1",
        timestamp=1_700_000_000,
    ),
]


def install(impl: FakeImpl) -> tuple[DeliveryFrames, list[tuple[Any, ...]]]:
    got: list[tuple[Any, ...]] = []
    frames = DeliveryFrames.install(FakeConnection(impl))
    assert frames is not None
    frames.register(READINGS, TAG, lambda *args: got.append(args))
    return frames, got


def as_pika_delivers(data: bytes) -> list[tuple[Any, ...]]:
    """What pika's decoder makes of deliveries: (tag, exchange, key, properties, body)."""
    out: list[tuple[Any, ...]] = []
    current: list[Any] = []
    for value in frames_of(data):
        if isinstance(value, pika.frame.Method) and isinstance(value.method, spec.Basic.Deliver):
            current = [value.method, None, []]
        elif isinstance(value, pika.frame.Header):
            current[1] = value
            if value.body_size == 0:
                out.append(_delivered(current))
        elif isinstance(value, pika.frame.Body):
            current[2].append(value.fragment)
            if sum(map(len, current[2])) == current[1].body_size:
                out.append(_delivered(current))
    return out


def _delivered(current: list[Any]) -> tuple[Any, ...]:
    method, header, parts = current
    return (
        method.delivery_tag,
        method.exchange,
        method.routing_key,
        vars(header.properties),
        b"".join(parts),
    )


def normalised(got: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(t, e, k, vars(p), b) for t, e, k, p, b in got]


def feed(frames: DeliveryFrames, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in sorted(set(cuts)):
        frames.data_received(data[last:cut])
        last = cut
    frames.data_received(data[last:])


def stream() -> tuple[bytes, bytes, bytes]:
    """Deliveries for the registered consumer, mixed with frames pika must get; and both parts."""
    ours = b""
    theirs = b""
    mixed = b""
    bodies = [b"", b"{}", b'{"seq": 1}' * 3, b"x" * 9000, bytes(range(256))]
    for n, body in enumerate(bodies * 2):
        message = deliver(n + 1, body, PROPS[n % len(PROPS)])
        other = confirm(n + 1) if n % 2 else HEARTBEAT
        ours += message
        theirs += other
        mixed += message + other
    return mixed, ours, theirs


def test_deliveries_match_pikas_decoding_and_the_rest_reaches_pika_in_order() -> None:
    mixed, ours, theirs = stream()
    impl = FakeImpl()
    frames, got = install(impl)
    frames.data_received(mixed)
    assert normalised(got) == as_pika_delivers(ours)
    assert b"".join(impl.handed) == theirs
    assert all(len(frames_of(chunk)) == 1 for chunk in impl.handed)  # one whole frame each
    assert impl.bytes_received == len(mixed)
    assert impl.frames_received == len(frames_of(mixed))
    assert frames.active
    assert frames.delivered == 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=30_000), max_size=40))
def test_any_split_of_the_stream_into_reads_gives_the_same_result(cuts: list[int]) -> None:
    mixed, ours, theirs = stream()
    impl = FakeImpl()
    frames, got = install(impl)
    feed(frames, mixed, [c for c in cuts if c <= len(mixed)])
    assert normalised(got) == as_pika_delivers(ours)
    assert b"".join(impl.handed) == theirs
    assert impl.bytes_received == len(mixed)


def test_every_single_byte_read_gives_the_same_result() -> None:
    data = deliver(1, b"a" * 5000, PROPS[2]) + confirm(7) + deliver(2, b"", PROPS[1])
    impl = FakeImpl()
    frames, got = install(impl)
    for i in range(len(data)):
        frames.data_received(data[i : i + 1])
    assert normalised(got) == as_pika_delivers(data)
    assert impl.handed == [confirm(7)]


def test_a_consumer_not_registered_is_left_to_pika_frame_by_frame() -> None:
    other = deliver(5, b"for someone else", PROPS[1], consumer="ctag1.other")
    on_other_channel = deliver(6, b"same tag, other channel", channel=3)
    mine = deliver(7, b"mine")
    impl = FakeImpl()
    frames, got = install(impl)
    frames.data_received(other + on_other_channel + mine)
    assert [g[0] for g in got] == [7]
    assert b"".join(impl.handed) == other + on_other_channel
    assert len(impl.handed) == len(frames_of(other + on_other_channel))
    assert frames.active


def test_a_frame_of_another_channel_inside_a_message_hands_everything_on_to_pika() -> None:
    first = deliver(1, b"whole")
    method_and_header = deliver(2, b"split by a confirm")
    body = pika.frame.Body(READINGS, b"split by a confirm").marshal()
    method_and_header = method_and_header[: -len(body)]
    rest = method_and_header + confirm(9) + body + deliver(3, b"after")
    impl = FakeImpl()
    frames, got = install(impl)
    frames.data_received(first + rest)
    assert [g[0] for g in got] == [1]
    assert b"".join(impl.handed) == rest  # pika assembles it, and everything after
    assert not frames.active
    frames.data_received(deliver(4, b"later"))
    assert [g[0] for g in got] == [1]
    assert impl.handed[-1] == deliver(4, b"later")


def test_a_bad_frame_end_is_pikas_to_refuse() -> None:
    message = deliver(2, b"broken")
    method_end = 7 + int.from_bytes(message[3:7], "big")  # the method frame's end octet
    damaged = message[:method_end] + b"\x00" + message[method_end + 1 :]
    with pytest.raises(pika.exceptions.InvalidFrameError):
        pika.frame.decode_frame(damaged)
    handed: list[bytes] = []
    impl = FakeImpl()
    frames, got = install(impl)
    frames._pika = handed.append  # pika would raise InvalidFrameError on what it is handed
    frames.data_received(deliver(1, b"fine") + damaged + deliver(3, b"after"))
    assert [g[0] for g in got] == [1]
    assert handed == [damaged + deliver(3, b"after")]
    assert not frames.active


def test_a_callback_error_is_raised_to_the_caller_and_the_rest_goes_to_pika() -> None:
    impl = FakeImpl()
    frames = DeliveryFrames.install(FakeConnection(impl))
    assert frames is not None
    got: list[int] = []

    def callback(tag: int, *_: Any) -> None:
        if tag == 2:
            raise ValueError("boom")
        got.append(tag)

    frames.register(READINGS, TAG, callback)
    after = deliver(3, b"c") + confirm(1)
    frames.data_received(deliver(1, b"a") + deliver(2, b"b") + after)
    assert got == [1]
    assert b"".join(impl.handed) == after
    with pytest.raises(ValueError, match="boom"):
        frames.raise_error()
    frames.raise_error()  # raised once


def test_bytes_pika_held_before_the_install_come_first() -> None:
    data = deliver(1, b"held over")
    impl = FakeImpl(_frame_buffer=data[:10])
    frames, got = install(impl)
    frames.data_received(data[10:])
    assert [g[4] for g in got] == [b"held over"]
    assert impl._frame_buffer == b""


def test_install_changes_nothing_on_a_connection_it_does_not_know() -> None:
    assert DeliveryFrames.install(object()) is None
    assert DeliveryFrames.install(type("Conn", (), {"_impl": object()})()) is None


def test_install_reads_more_per_receive_than_pikas_default() -> None:
    transport = type("Transport", (), {"_MAX_RECV_BYTES": 4096})()
    impl = FakeImpl()
    impl._transport = transport  # type: ignore[attr-defined]
    assert DeliveryFrames.install(FakeConnection(impl)) is not None
    assert transport._MAX_RECV_BYTES == RECV_BYTES


def test_equal_properties_are_decoded_once_and_shared() -> None:
    impl = FakeImpl()
    frames, got = install(impl)
    frames.data_received(b"".join(deliver(n, b"{}", PROPS[2]) for n in range(1, 4)))
    assert got[0][3] is got[1][3] is got[2][3]
    assert got[0][3].headers == {"x-mqtt-publish-qos": 1, "x-mqtt-dup": False}


def test_a_read_with_deliveries_ends_the_connections_wait_as_pikas_dispatch_would() -> None:
    impl = FakeImpl()
    connection = FakeConnection(impl)
    frames = DeliveryFrames.install(connection)
    assert frames is not None
    frames.register(READINGS, TAG, lambda *_: None)
    frames.data_received(confirm(1) + HEARTBEAT)
    assert connection.wakes == []  # pika's own frames: pika decides
    message = deliver(1, b"{}")
    frames.data_received(message[:20])
    assert connection.wakes == []  # nothing delivered yet
    frames.data_received(message[20:] + deliver(2, b"{}"))
    assert connection.wakes == [-1]  # a negative number only ends process_data_events


def test_install_needs_the_blocking_connections_dispatch_request() -> None:
    assert DeliveryFrames.install(type("Conn", (), {"_impl": FakeImpl()})()) is None


def test_a_message_too_large_to_hold_goes_to_pika_frame_by_frame() -> None:
    big = deliver(2, b"b" * 2 * MAX_HELD_BYTES, frame_max=131_064)
    handed: list[bytes] = []
    frames, got = install(FakeImpl())
    frames._pika = handed.append  # pika's own buffer takes partial frames
    frames.data_received(deliver(1, b"small") + big[:1000])
    assert [g[0] for g in got] == [1]
    for start in range(1000, len(big), 65_536):
        frames.data_received(big[start : start + 65_536])
    assert not frames.active  # pika took over once the held bytes passed the limit
    assert b"".join(handed) == big
    assert max(map(len, handed)) <= MAX_HELD_BYTES + 65_536
    assert len(frames._rest) == 0


def test_what_pika_raises_on_a_frame_it_reads_is_raised_not_swallowed() -> None:
    handed: list[bytes] = []

    def pika_refuses(data: bytes) -> None:
        handed.append(data)
        raise struct.error("pika could not decode this frame")

    frames, got = install(FakeImpl())
    frames._pika = pika_refuses
    with pytest.raises(struct.error, match="pika could not decode"):
        frames.data_received(confirm(1) + deliver(2, b"after"))
    assert handed == [confirm(1)]  # the rest was not handed on as if pika had read it
    assert got == []


def test_a_routing_key_that_is_not_utf8_is_read_as_escaped_text_and_the_fast_path_stays_on() -> (
    None
):
    impl = FakeImpl()
    frames, got = install(impl)
    data = deliver(7, b"{}", routing_key=b"sensors.\xff.s0")  # type: ignore[arg-type]
    data += deliver(8, b"{}")
    frames.data_received(data)
    assert [(tag, key) for tag, _exchange, key, _props, _body in got] == [
        (7, "sensors.\\xff.s0"),
        (8, "sensors.n1.s1"),
    ]
    assert frames.active
    assert impl.handed == []
