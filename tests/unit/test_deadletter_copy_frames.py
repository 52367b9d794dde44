"""A dead-letter copy's frames, marshalled by the pipeline instead of pika's ``basic_publish``.

The consumer publishes each copy by writing its three frames itself
(pipeline.deadletters.encode_copy_properties, pipeline.frames.content_frames). What goes on the
wire must be exactly what pika would have written for ``copy_properties``: these tests hold the
bytes to pika's own marshalling, for generated properties and headers, and then check what the
publisher does with them. tests/system/test_hostile_input.py and test_pipeline.py send such
copies to RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pika.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika.spec import Basic, BasicProperties

from pipeline.deadletters import (
    DeadLetterPublisher,
    Delivery,
    copy_properties,
    encode_copy_properties,
)
from pipeline.frames import content_frames, publish_method_frame
from tempmon_contract import deadletter

NOW = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
KEY = b"k" * 32

_short_text = st.text(max_size=40).filter(lambda t: len(t.encode()) <= 255)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=60)
    | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_short_text, inner, max_size=3),
    max_leaves=6,
)
# Header names a publisher may write, including the ones the copy drops or sets itself.
_names = st.sampled_from(
    [
        "x-mqtt-publish-qos",
        "mine",
        "x-death",
        "x-first-death-queue",
        deadletter.SIGNATURE_HEADER,
        deadletter.REASON_HEADER,
        deadletter.ROUTING_KEY_HEADER,
        deadletter.REJECTED_AT_HEADER,
    ]
) | _short_text.filter(lambda t: len(t) > 0)
_properties = st.builds(
    BasicProperties,
    content_type=st.none() | _short_text,
    content_encoding=st.none() | _short_text,
    message_id=st.none() | _short_text,
    timestamp=st.none() | st.integers(0, 2**63 - 1),
    headers=st.none() | st.dictionaries(_names, _values, max_size=5),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
)
_deliveries = st.builds(
    Delivery,
    tag=st.integers(1, 2**40),
    queue=st.sampled_from(["readings", "node-status"]),
    routing_key=_short_text,
    properties=_properties,
    body=st.binary(max_size=600),
    refused=st.none() | st.text(max_size=80),
)


def _pika_bytes(properties: BasicProperties) -> bytes:
    return b"".join(properties.encode())


@settings(max_examples=300, deadline=None)
@given(delivery=_deliveries, reason=st.text(max_size=200), key=st.none() | st.just(KEY))
def test_the_encoded_copy_is_what_pika_encodes_for_copy_properties(
    delivery: Delivery, reason: str, key: bytes | None
) -> None:
    expected = copy_properties(delivery, reason, key=key, now=NOW)
    encoded, message_id = encode_copy_properties(delivery, reason, key=key, now=NOW)
    assert encoded == _pika_bytes(expected)
    assert message_id == expected.message_id
    # And it decodes back to the same properties.
    decoded = BasicProperties()
    decoded.decode(encoded)
    assert decoded.headers == expected.headers
    assert decoded.delivery_mode == 2


def test_the_copy_headers_come_after_the_kept_ones_and_replace_a_publishers_own() -> None:
    original = BasicProperties(
        headers={
            deadletter.REASON_HEADER: "forged reason",
            "mine": "kept",
            "x-death": [{"queue": "readings"}],
            deadletter.SIGNATURE_HEADER: "v1:forged:0",
        }
    )
    delivery = Delivery(5, "readings", "sensors.pi-01.t1", original, b"{}")
    headers = copy_properties(delivery, "seq: missing", key=KEY, now=NOW).headers
    assert headers is not None
    assert list(headers) == [
        "mine",
        deadletter.REASON_HEADER,
        deadletter.ROUTING_KEY_HEADER,
        deadletter.QUEUE_HEADER,
        deadletter.REJECTED_AT_HEADER,
        deadletter.REJECTED_BY_HEADER,
        deadletter.SIGNATURE_HEADER,
    ]
    assert headers[deadletter.REASON_HEADER] == "seq: missing"
    assert headers[deadletter.SIGNATURE_HEADER] != "v1:forged:0"


def test_kept_headers_are_encoded_once_per_shared_properties_object() -> None:
    shared = BasicProperties(headers={"x-mqtt-publish-qos": 1, "mine": "kept"})
    cache: dict[int, tuple[BasicProperties, bytes]] = {}
    first = encode_copy_properties(
        Delivery(1, "readings", "a", shared, b"1"), "r", key=None, now=NOW, kept=cache
    )
    assert list(cache) == [id(shared)]
    shared.headers = {"changed": "after caching"}  # never done: the objects are read-only
    second = encode_copy_properties(
        Delivery(2, "readings", "a", shared, b"1"), "r", key=None, now=NOW, kept=cache
    )
    assert second == first  # the cached encoding was used
    fresh = BasicProperties(headers={"x-mqtt-publish-qos": 1, "mine": "kept"})
    third = encode_copy_properties(
        Delivery(3, "readings", "a", fresh, b"1"), "r", key=None, now=NOW, kept=cache
    )
    assert third == first
    assert len(cache) == 2


def test_an_over_long_short_string_is_refused_as_pika_refuses_it() -> None:
    delivery = Delivery(1, "readings", "a", BasicProperties(content_type="t" * 256), b"")
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        encode_copy_properties(delivery, "r", key=None, now=NOW)
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        _pika_bytes(copy_properties(delivery, "r", key=None, now=NOW))


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 350])
def test_frames_are_pikas_frames(size: int) -> None:
    body = bytes(range(256)) * 2
    body = body[:size]
    props = BasicProperties(content_type="application/json", headers={"a": 1}, timestamp=7)
    method = publish_method_frame(3, "", "readings.dead", mandatory=True)
    assert (
        method
        == pika.frame.Method(
            3, Basic.Publish(exchange="", routing_key="readings.dead", mandatory=True)
        ).marshal()
    )
    frames = content_frames(3, _pika_bytes(props), body, 100)
    expected = [pika.frame.Header(3, len(body), props).marshal()]
    expected += [pika.frame.Body(3, body[i : i + 100]).marshal() for i in range(0, size, 100)]
    assert frames == expected


# --- the publisher -------------------------------------------------------------------------


class _Connection:
    """pika's Connection as the publisher uses it: its output step and frame size."""

    def __init__(self) -> None:
        self._body_max_length = 120
        self.written: list[bytes] = []

    def _output_marshaled_frames(self, frames: list[bytes]) -> None:
        self.written += frames


class _Impl:
    """pika's Channel: confirms, returns, and the state the fast publish checks."""

    def __init__(self) -> None:
        self.connection = _Connection()
        self.channel_number = 2
        self.is_open = True
        self.published: list[tuple[str, bytes, BasicProperties]] = []
        self.on_confirm: Callable[..., None] | None = None

    def add_on_return_callback(self, callback: Callable[..., None]) -> None:
        pass

    def confirm_delivery(
        self, ack_nack_callback: Callable[..., None], callback: Callable[[Any], None]
    ) -> None:
        self.on_confirm = ack_nack_callback
        callback(None)

    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties,
        mandatory: bool,
    ) -> None:
        assert (exchange, mandatory) == ("", True)
        self.published.append((routing_key, body, properties))


class _Frame:
    def __init__(self, method: Any) -> None:
        self.method = method


def _publisher() -> tuple[DeadLetterPublisher, _Impl]:
    impl = _Impl()

    class _Channel:
        _impl = impl

    return DeadLetterPublisher(_Channel(), None, timeout_s=1), impl  # type: ignore[arg-type]


def _split(written: list[bytes]) -> list[tuple[int, bytes]]:
    """(frame type, payload) of each frame written; a copy's frames come as one chunk."""
    frames = []
    for chunk in written:
        at = 0
        while at < len(chunk):
            size = int.from_bytes(chunk[at + 3 : at + 7], "big")
            end = at + 7 + size
            assert chunk[end] == 0xCE
            frames.append((chunk[at], chunk[at + 7 : end]))
            at = end + 1
    return frames


def test_the_publisher_writes_pikas_frames_for_each_copy_and_settles_them() -> None:
    publisher, impl = _publisher()
    props = BasicProperties(message_id="m-1", headers={"x-mqtt-publish-qos": 1})
    big = Delivery(7, "readings", "sensors.pi-01.t1", props, b"[" * 300)
    small = Delivery(9, "node-status", "status.pi-01", BasicProperties(), b"")
    publisher.dead_letter(big, "payload: not UTF-8 JSON", "readings.dead", key=KEY)
    publisher.dead_letter(small, "payload: empty", "node-status.dead", key=None)
    assert impl.published == []  # not through pika's basic_publish
    assert len(impl.connection.written) == 2  # one chunk for each copy
    frames = _split(impl.connection.written)
    # big: method, header, three body frames (300 bytes at 120 a frame); small: no body frame
    assert [kind for kind, _ in frames] == [1, 2, 3, 3, 3, 1, 2]
    method = Basic.Publish()
    method.decode(frames[0][1], 4)
    assert (method.exchange, method.routing_key, method.mandatory) == ("", "readings.dead", True)
    header = BasicProperties()
    header.decode(frames[1][1], 12)
    assert header.headers is not None
    assert header.headers[deadletter.REASON_HEADER] == "payload: not UTF-8 JSON"
    assert header.headers["x-mqtt-publish-qos"] == 1
    assert header.message_id == "m-1"
    assert b"".join(payload for _, payload in frames[2:5]) == big.body
    small_method = Basic.Publish()
    small_method.decode(frames[5][1], 4)
    assert small_method.routing_key == "node-status.dead"
    # Confirms settle them as before, by publish number.
    assert impl.on_confirm is not None
    impl.on_confirm(_Frame(Basic.Ack(delivery_tag=2, multiple=True)))
    assert [(d.tag, failure) for d, failure in publisher.settled()] == [(7, None), (9, None)]


def test_a_closed_channel_takes_pikas_way() -> None:
    publisher, impl = _publisher()
    impl.is_open = False
    delivery = Delivery(3, "readings", "sensors.a.b", BasicProperties(), b"x")
    publisher.dead_letter(delivery, "why", "readings.dead", key=None)
    assert impl.connection.written == []
    [(queue, body, properties)] = impl.published  # pika's basic_publish raises on a closed one
    assert (queue, body) == ("readings.dead", b"x")
    assert properties.headers is not None
    assert properties.headers[deadletter.REASON_HEADER] == "why"
    assert publisher.outstanding == 1
