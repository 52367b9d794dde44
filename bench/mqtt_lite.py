"""A minimal asyncio MQTT 3.1.1 publisher, for benchmarks that need thousands of connections.

paho-mqtt runs a network thread per client, which does not scale to 10,000 simulated nodes in
a few processes. This client speaks only what an edge agent needs from the broker: CONNECT with
user name and password (clean session), CONNACK, PUBLISH at QoS 1 with packet ids, PUBACK,
PINGREQ/PINGRESP and DISCONNECT. It does not subscribe, retransmit or reconnect: a benchmark
counts a dropped connection or a missing PUBACK instead of hiding it.

The packet encoders and the decoder are pure functions; :class:`MqttConnection` is the thin
asyncio shell around them (one :class:`asyncio.Protocol` per connection, no task per reader).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

__all__ = [
    "CONNACK_CODES",
    "MqttConnection",
    "MqttError",
    "connect",
    "encode_connect",
    "encode_publish",
    "parse_packets",
]

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
PINGREQ, PINGRESP, DISCONNECT = 0xC0, 0xD0, 0xE0
_MAX_REMAINING = 268_435_455  # the largest remaining length four varint bytes can say

CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class MqttError(Exception):
    """The broker refused or broke the session; ``reason`` is short enough to count by."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- pure encoding and decoding ------------------------------------------------------------------
def _varint(n: int) -> bytes:
    if not 0 <= n <= _MAX_REMAINING:
        raise ValueError(f"remaining length {n} is outside 0..{_MAX_REMAINING}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def encode_connect(client_id: str, username: str, password: str, keepalive: int) -> bytes:
    """CONNECT, protocol level 4 (3.1.1), clean session, user name and password."""
    flags = 0x80 | 0x40 | 0x02
    header = _string("MQTT") + struct.pack("!BBH", 4, flags, keepalive)
    return _packet(CONNECT, header + _string(client_id) + _string(username) + _string(password))


def encode_publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH at QoS 1, not retained, first attempt (DUP clear)."""
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id} is outside 1..65535")
    return _packet(PUBLISH | 0x02, _string(topic) + struct.pack("!H", packet_id) + payload)


PINGREQ_PACKET = bytes([PINGREQ, 0])
DISCONNECT_PACKET = bytes([DISCONNECT, 0])


def parse_packets(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete packet off the front of ``buf``: (first byte, body) pairs.

    What is left in ``buf`` is the start of a packet still arriving.

    Raises:
        MqttError: a remaining length longer than four bytes (not MQTT).
    """
    packets: list[tuple[int, bytes]] = []
    pos = 0
    while len(buf) - pos >= 2:
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= len(buf):
                del buf[:pos]
                return packets
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MqttError("malformed remaining length")
        if len(buf) - i < length:
            break
        packets.append((buf[pos], bytes(buf[i : i + length])))
        pos = i + length
    del buf[:pos]
    return packets


# -- the asyncio shell ---------------------------------------------------------------------------
class MqttConnection(asyncio.Protocol):
    """One client connection. Create it with :func:`connect`.

    ``on_ack(seconds)`` is called for each PUBACK with the time since its PUBLISH was written.
    ``lost`` says the connection ended without our DISCONNECT (the broker closed it, or the
    network did); ``inflight`` holds what was published and not yet acknowledged.
    """

    def __init__(self, on_ack: Callable[[float, object], None]) -> None:
        self.on_ack = on_ack
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.inflight: dict[int, tuple[float, object]] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self.lost = False
        self.lost_reason = ""
        self.last_sent = time.monotonic()
        self._buf = bytearray()
        self._next_id = 0
        self._closing = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            packets = parse_packets(self._buf)
        except MqttError as exc:
            self._fail(exc.reason)
            return
        for first, body in packets:
            kind = first & 0xF0
            if kind == PUBACK and len(body) == 2:
                (packet_id,) = struct.unpack("!H", body)
                sent = self.inflight.pop(packet_id, None)
                if sent is not None:
                    self.on_ack(time.monotonic() - sent[0], sent[1])
            elif kind == CONNACK and len(body) == 2:
                if not self.connack.done():
                    self.connack.set_result(body[1])
            elif kind == PINGRESP:
                pass
            else:
                self._fail(f"unexpected packet 0x{first:02x}")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self.lost = True
            self.lost_reason = str(exc) if exc else "closed by the broker"
        if not self.connack.done():
            self.connack.set_exception(MqttError("closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.connack.done():
            self.connack.set_exception(MqttError(reason))
        if self.transport is not None:
            self.transport.abort()

    # the client's side
    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.last_sent = time.monotonic()

    def publish(self, topic: str, payload: bytes, tag: object = None) -> None:
        """PUBLISH at QoS 1; ``tag`` comes back in ``on_ack``.

        Raises:
            MqttError: 65,535 messages are already waiting for their PUBACK (the id space of
                one session), or the connection is closed.
        """
        if not self.open:
            raise MqttError("connection closed")
        if len(self.inflight) >= 0xFFFF:
            raise MqttError("no free packet id")
        while True:
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self.inflight:
                break
        self.inflight[self._next_id] = (time.monotonic(), tag)
        self._write(encode_publish(topic, payload, self._next_id))

    def ping_if_idle(self, idle_s: float, now: float) -> bool:
        """PINGREQ when nothing was sent for ``idle_s``; True if one was sent."""
        if self.open and now - self.last_sent >= idle_s:
            self._write(PINGREQ_PACKET)
            return True
        return False

    def disconnect(self) -> None:
        """DISCONNECT and close, as a clean shutdown does; safe to call twice."""
        self._closing = True
        if self.open:
            self._write(DISCONNECT_PACKET)
            assert self.transport is not None
            self.transport.close()


async def connect(
    host: str,
    port: int,
    *,
    client_id: str,
    username: str,
    password: str,
    keepalive: int,
    on_ack: Callable[[float, object], None],
    timeout: float,
) -> MqttConnection:
    """Open a TCP connection, send CONNECT and wait for a successful CONNACK.

    Raises:
        MqttError: the broker refused the session (the CONNACK code's meaning is the reason),
            or closed the connection before answering.
        OSError: the TCP connection failed (refused, no free port, ...).
        TimeoutError: no CONNACK within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _transport, conn = await loop.create_connection(lambda: MqttConnection(on_ack), host, port)
        conn._write(encode_connect(client_id, username, password, keepalive))
        try:
            code = await conn.connack
        except BaseException:
            conn.disconnect()
            raise
    if code != 0:
        conn.disconnect()
        raise MqttError(f"CONNACK {code}: {CONNACK_CODES.get(code, 'unknown code')}")
    return conn
