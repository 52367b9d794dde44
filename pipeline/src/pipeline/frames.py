"""A shorter inbound path for pika's deliveries: frames to the consumer's callback in one step.

pika decodes every inbound frame into objects (a method frame, a content header with its
properties, one object per body frame), trims its receive buffer by copying the rest after every
frame, assembles the three kinds back into a message, and BlockingConnection then queues the
message as an event and dispatches it later. For the consumer that was about two thirds of its
process's time (bench/RESULTS.md, issue 17), more than the decoding, the batching and the
database parameters together.

:class:`DeliveryFrames` takes the connection's incoming bytes before pika does. A ``Basic.Deliver``
for a consumer registered here, with its header frame and body frames, is read with offsets into
the received bytes and handed to the consumer's callback at once, as ``(delivery_tag, exchange,
routing_key, properties, body)``. Every other frame (replies, publisher confirms, heartbeats,
closes, deliveries of consumers not registered here) goes to pika's own handler, one whole frame
at a time and in order, so pika sees exactly what it would have seen, less those deliveries.

Anything the fast path does not expect (a bad frame-end octet, a content frame of another channel
between a message's frames, a header or body that does not add up) hands every byte from that
message on to pika and turns the fast path off for the rest of the connection: pika then does
what it always did, including raising its own error for a broken stream.

Properties are decoded by pika (``BasicProperties.decode``) and kept per distinct encoding, since a
queue fed by one kind of publisher repeats the same few: the objects are shared between
deliveries and must be treated as read-only, which the consumer does (it copies what it changes,
pipeline.deadletters.copy_properties).

pika is pinned (constraints.txt); :meth:`DeliveryFrames.install` returns None if the connection
lacks what it replaces, and the consumer then uses pika's path (tests/unit/test_frames.py,
tests/system/test_pika_fast_path.py).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import pika.exceptions
from pika.spec import BasicProperties

__all__ = [
    "DeliveryCallback",
    "DeliveryFrames",
    "content_frames",
    "publish_method_frame",
    "short_string",
]

log = logging.getLogger(__name__)

# (delivery_tag, exchange, routing_key, properties, body)
DeliveryCallback = Callable[[int, str, str, BasicProperties, bytes], None]

_FRAME = struct.Struct(">BHI")  # type, channel, payload size; then the payload and 0xCE
_TAG = struct.Struct(">Q")
_CONTENT = struct.Struct(">HHQ")  # class, weight, body size; then the properties
_METHOD, _CONTENT_HEADER, _BODY = 1, 2, 3
_FRAME_END = 0xCE
_BASIC_DELIVER = 0x003C003C  # class 60 (basic), method 60 (deliver)
_METHOD_ID = struct.Struct(">I")

# How many bytes one recv() may take. pika reads 4 KiB at a time (a dozen readings); with the
# frames read by offset instead of by trimming, a larger read costs no more per byte.
RECV_BYTES = 64 * 1024
_PROPERTIES_KEPT = 256
# A message still incomplete past this many bytes goes to pika, which takes body frames one at
# a time: holding it here would copy the held bytes again on every read, quadratic in its size.
# The gateway's broker refuses messages over 8 KiB; a broker configured otherwise may not.
MAX_HELD_BYTES = 1024 * 1024


class _GiveUp(Exception):  # noqa: N818 - internal control flow, never leaves this module
    """The stream holds something the fast path does not read: pika takes over from here."""


class _Handled(_GiveUp):
    """A callback raised; the fast path is off already and pika has the rest."""


class DeliveryFrames:
    """The connection's inbound bytes, read for registered consumers before pika sees them."""

    def __init__(self, impl: Any, wake: Callable[[int], None]) -> None:
        self._impl = impl
        self._wake = wake
        self._pika: Callable[[bytes], None] = impl._on_data_available
        self._consumers: dict[tuple[int, bytes], DeliveryCallback] = {}
        self._rest = b""
        self._properties: dict[bytes, BasicProperties] = {}
        self.active = True
        self.delivered = 0  # messages handed to callbacks by the fast path
        self.error: BaseException | None = None  # what a callback raised, for the caller

    @classmethod
    def install(cls, connection: Any) -> DeliveryFrames | None:
        """Put the fast path in front of ``connection``'s frame handling (a BlockingConnection).

        Returns None, changing nothing, if this pika has no such handler to take over.
        """
        impl = getattr(connection, "_impl", None)
        wake = getattr(connection, "_request_channel_dispatch", None)
        if impl is None or not callable(getattr(impl, "_on_data_available", None)):
            return None
        if not isinstance(getattr(impl, "_frame_buffer", None), bytes) or not callable(wake):
            return None
        frames = cls(impl, wake)
        # Bytes pika holds already (a partial frame) come first.
        frames._rest, impl._frame_buffer = impl._frame_buffer, b""
        impl._on_data_available = frames.data_received
        transport: Any = getattr(impl, "_transport", None)
        recv_bytes = getattr(transport, "_MAX_RECV_BYTES", None)
        if isinstance(recv_bytes, int):
            transport._MAX_RECV_BYTES = max(recv_bytes, RECV_BYTES)
        return frames

    def register(self, channel_number: int, consumer_tag: str, callback: DeliveryCallback) -> None:
        """Hand the deliveries for ``consumer_tag`` on that channel to ``callback``.

        Register before ``basic_consume`` with the same tag, so that no delivery of the
        consumer takes pika's path and the order stays the broker's.
        """
        self._consumers[(channel_number, consumer_tag.encode())] = callback

    def raise_error(self) -> None:
        """Raise what a callback raised (once), as if pika's dispatch had raised it."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    # -- reading -----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Read ``data`` (in place of pika's ``Connection._on_data_available``)."""
        if not self.active:
            self._pika(data)
            return
        buf = self._rest + data if self._rest else data
        end = len(buf)
        pos = 0
        delivered = self.delivered
        while end - pos >= 8:
            kind, channel, size = _FRAME.unpack_from(buf, pos)
            stop = pos + 7 + size  # where the frame-end octet is
            if stop >= end:
                break
            if (
                kind == _METHOD
                and size >= 4
                and _METHOD_ID.unpack_from(buf, pos + 7)[0] == _BASIC_DELIVER
            ):
                try:
                    after = self._deliver(buf, pos, stop, end, channel)
                except _Handled:
                    return
                except (_GiveUp, struct.error, IndexError, UnicodeDecodeError):
                    self._give_up(buf[pos:])
                    return
                if after == 0:
                    break  # the message is not all here yet
                if after > 0:
                    pos = after
                    continue
            # Not ours: pika reads this one frame, as it would have; what pika raises is
            # pika's to raise (never taken for a stream the fast path cannot read).
            pos = stop + 1
            self._pika(buf[pos - size - 8 : pos])
        if end - pos > MAX_HELD_BYTES:
            self._give_up(buf[pos:])
            return
        self._rest = buf[pos:] if pos < end else b""
        if self.delivered != delivered:
            # BlockingConnection.process_data_events returns once something was dispatched;
            # these deliveries bypassed its dispatch, so ask it to return as it would have (a
            # negative channel number only ends the wait).
            self._wake(-1)

    def _deliver(self, buf: bytes, pos: int, stop: int, end: int, channel: int) -> int:
        """Read the message starting at ``pos`` and hand it over.

        Returns the position after it, 0 if it is not complete yet, or -1 if its consumer is
        not registered here (pika reads its frames then).
        """
        if buf[stop] != _FRAME_END:
            raise _GiveUp
        p = pos + 11
        n = buf[p]
        callback = self._consumers.get((channel, buf[p + 1 : p + 1 + n]))
        if callback is None:
            return -1
        p += 1 + n
        (delivery_tag,) = _TAG.unpack_from(buf, p)
        p += 9  # and the redelivered bit
        # Text as the consumer takes pika's (pipeline.consumer._text): an AMQP publisher may
        # send a routing key that is not UTF-8; it stays readable, and the fast path stays on.
        n = buf[p]
        exchange = buf[p + 1 : p + 1 + n].decode("utf-8", "backslashreplace")
        p += 1 + n
        n = buf[p]
        routing_key = buf[p + 1 : p + 1 + n].decode("utf-8", "backslashreplace")
        if p + 1 + n != stop:
            raise _GiveUp

        content = self._content(buf, stop + 1, end, channel)
        if content is None:
            return 0
        properties, body, after, frames = content
        impl = self._impl
        impl.bytes_received += after - pos
        impl.frames_received += frames
        self.delivered += 1
        try:
            callback(delivery_tag, exchange, routing_key, properties, body)
        except Exception as exc:
            # pika's own dispatch would have raised this out of process_data_events; the
            # caller does (raise_error). The rest of the bytes go to pika meanwhile.
            self.error = exc
            self._give_up(buf[after:])
            raise _Handled from exc
        return after

    def _content(
        self, buf: bytes, h: int, end: int, channel: int
    ) -> tuple[BasicProperties, bytes, int, int] | None:
        """The content header frame at ``h`` and the body frames after it.

        Returns the properties, the body, the position after the last frame and the number of
        frames (the method's included), or None if they are not all here yet.
        """
        if end - h < 8:
            return None
        kind, on, size = _FRAME.unpack_from(buf, h)
        header_stop = h + 7 + size
        if header_stop >= end:
            return None
        if kind != _CONTENT_HEADER or on != channel or size < 14 or buf[header_stop] != _FRAME_END:
            raise _GiveUp
        _class, _weight, body_size = _CONTENT.unpack_from(buf, h + 7)
        raw = buf[h + 19 : header_stop]
        properties = self._properties.get(raw)
        if properties is None:
            properties = self._decode_properties(raw)
        b = header_stop + 1
        if body_size == 0:
            return properties, b"", b, 2
        parts: list[bytes] = []
        got = 0
        while got < body_size:
            if end - b < 8:
                return None
            kind, on, size = _FRAME.unpack_from(buf, b)
            body_stop = b + 7 + size
            if body_stop >= end:
                return None
            if kind != _BODY or on != channel or buf[body_stop] != _FRAME_END:
                raise _GiveUp
            parts.append(buf[b + 7 : body_stop])
            got += size
            b = body_stop + 1
        if got != body_size:
            raise _GiveUp
        return properties, parts[0] if len(parts) == 1 else b"".join(parts), b, 2 + len(parts)

    def _decode_properties(self, raw: bytes) -> BasicProperties:
        properties = BasicProperties()
        try:
            properties.decode(raw)
        except Exception as exc:
            raise _GiveUp from exc
        if len(self._properties) >= _PROPERTIES_KEPT:
            self._properties.clear()
        self._properties[raw] = properties
        return properties

    def _give_up(self, rest: bytes) -> None:
        """pika reads everything from here on, starting with ``rest``."""
        if self.active:
            self.active = False
            log.warning(
                "unexpected AMQP frame sequence; pika's own frame handling takes over for the "
                "rest of this connection"
            )
        self._rest = b""
        self._wake(-1)
        if rest:
            self._pika(rest)


# -- outbound: a published message's frames, marshalled in one step ----------------------------

_BASIC_PUBLISH = struct.Struct(">HHH")  # class 60 (basic), method 40 (publish), reserved ticket


def short_string(value: str | bytes) -> bytes:
    """An AMQP short string: its length in one octet, then its bytes (UTF-8 for text).

    Raises:
        pika.exceptions.ShortStringTooLong: over 255 bytes, as pika's encoder raises.
    """
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 255:
        raise pika.exceptions.ShortStringTooLong(raw)
    return bytes((len(raw),)) + raw


def publish_method_frame(
    channel: int, exchange: str, routing_key: str, *, mandatory: bool
) -> bytes:
    """The marshalled ``Basic.Publish`` method frame, as pika's ``Frame.marshal`` makes it.

    A publisher that sends many messages to one queue makes it once and reuses it.
    """
    payload = b"".join(
        (
            _BASIC_PUBLISH.pack(60, 40, 0),
            short_string(exchange),
            short_string(routing_key),
            b"\x01" if mandatory else b"\x00",  # mandatory is bit 0, immediate bit 1
        )
    )
    return _FRAME.pack(_METHOD, channel, len(payload)) + payload + b"\xce"


def content_frames(channel: int, properties: bytes, body: bytes, body_max: int) -> list[bytes]:
    """The marshalled content header frame and body frames of one message.

    ``properties`` is the property flags and list as ``BasicProperties.encode`` makes them
    (joined); ``body_max`` is the largest body frame payload the connection allows
    (frame_max less the 8 bytes of framing). No body frame for an empty body, as in pika.
    """
    header = _CONTENT.pack(60, 0, len(body)) + properties
    frames = [_FRAME.pack(_CONTENT_HEADER, channel, len(header)) + header + b"\xce"]
    for start in range(0, len(body), body_max):
        chunk = body[start : start + body_max]
        frames.append(_FRAME.pack(_BODY, channel, len(chunk)) + chunk + b"\xce")
    return frames
