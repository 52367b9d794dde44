"""A fake paho-mqtt client, shipped with the agent for tests (as gpiozero ships ``MockFactory``).

:class:`FakeBrokers` stands for the brokers an agent may reach, by address; its
:meth:`~FakeBrokers.client` is a ``client_factory`` for :class:`edge_agent.session.Session`
(or :class:`edge_agent.agent.Agent`). Each :class:`FakeMqttClient` implements exactly the
part of ``paho.mqtt.client.Client`` (callback API version 2, MQTT 3.1.1) the session uses
(:class:`edge_agent.session.MqttClient`) and nothing else, and behaves as paho does:

* ``connect`` raises ``ConnectionRefusedError`` for an address in
  :attr:`FakeBrokers.unreachable`; otherwise the CONNACK arrives in the next ``loop``, with
  the return code of :attr:`FakeBrokers.connack` for that address (0, accepted, by default;
  5 is "not authorized"), or never, for an address in :attr:`FakeBrokers.silent`. A refused
  CONNACK makes that ``loop`` return ``MQTT_ERR_CONN_REFUSED``.
* ``publish`` records what was sent (:attr:`FakeMqttClient.published`) and returns the
  message id. The PUBACK of a QoS 1 publish arrives in a later ``loop``: at once while
  :attr:`FakeMqttClient.auto_puback` is on (the default of :attr:`FakeBrokers.auto_puback`),
  except for the message ids :meth:`FakeMqttClient.withhold` holds back, which stay
  unacknowledged, as RabbitMQ 4.x leaves a publish its full queue refused, until
  :meth:`FakeMqttClient.puback` sends them. A publish on a connection that is not up
  returns ``MQTT_ERR_NO_CONN``, and ``is_published()`` of it raises, as in paho 2.x.
* :meth:`FakeMqttClient.drop` breaks the connection: the next ``loop`` calls
  ``on_disconnect`` ("Unspecified error") and returns ``MQTT_ERR_CONN_LOST``. ``disconnect``
  calls ``on_disconnect`` at once ("Success"). A client that was disconnected or dropped
  refuses to connect again: the session must build a new client for each connection.

Not modelled: paho's window (``max_inflight_messages``: every publish goes out at once), QoS
0 and 2, subscriptions, TLS, and time (nothing here sleeps longer than ``loop``'s timeout
caps at 5 ms).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import ConnackCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from edge_agent.session import MqttClient

__all__ = ["Address", "FakeBrokers", "FakeMqttClient", "FakePublishInfo", "Published"]

Address = tuple[str, int]
"""A broker's ``(host, port)``, as ``connect`` names it."""


@dataclass(frozen=True)
class Published:
    """One publish that went out on a fake connection."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int

    def json(self) -> Any:
        """The payload decoded as JSON (readings and statuses are JSON objects)."""
        return json.loads(self.payload)


class FakePublishInfo:
    """What :meth:`FakeMqttClient.publish` returns, like paho's ``MQTTMessageInfo``."""

    def __init__(self, mid: int, rc: int) -> None:
        self.mid = mid
        self.rc = rc
        self.acked = False

    def is_published(self) -> bool:
        """Whether the PUBACK came.

        Raises:
            RuntimeError: the publish failed (paho 2.x raises then too).
        """
        if self.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"Message publish failed: {mqtt.error_string(self.rc)}")
        return self.acked


class FakeBrokers:
    """The brokers fake clients reach, by address, and how each behaves. All start healthy.

    Use :meth:`client` as the session's ``client_factory``.
    """

    def __init__(self, *, auto_puback: bool = True) -> None:
        self.auto_puback = auto_puback
        """Whether new clients acknowledge every QoS 1 publish in their next ``loop``."""
        self.unreachable: set[Address] = set()
        """Addresses whose ``connect`` raises ``ConnectionRefusedError``."""
        self.connack: dict[Address, int] = {}
        """The CONNACK return code (MQTT 3.1.1: 0 accepted, 1-5 refused) by address."""
        self.silent: set[Address] = set()
        """Addresses that take the connection and never send a CONNACK."""
        self.clients: list[FakeMqttClient] = []
        """Every client made, in order."""
        self.attempts: list[tuple[float, Address]] = []
        """Every ``connect``, with its ``time.monotonic()``, reachable or not."""

    def client(self) -> FakeMqttClient:
        """A new client: the ``client_factory`` to hand to the session."""
        client = FakeMqttClient(self)
        self.clients.append(client)
        return client

    @property
    def last(self) -> FakeMqttClient:
        """The newest client.

        Raises:
            LookupError: no client was made yet.
        """
        if not self.clients:
            raise LookupError("no fake MQTT client was made yet")
        return self.clients[-1]

    def published(self, topic_prefix: str = "") -> list[Published]:
        """What every client published, in order, whose topic starts with ``topic_prefix``."""
        return [
            p
            for client in self.clients
            for p in client.published
            if p.topic.startswith(topic_prefix)
        ]


class FakeMqttClient:
    """One fake paho client, for one connection (see the module's description)."""

    def __init__(self, brokers: FakeBrokers) -> None:
        self.brokers = brokers
        self.on_connect: Callable[..., None] | None = None
        self.on_disconnect: Callable[..., None] | None = None
        self.on_publish: Callable[..., None] | None = None
        self.auto_puback = brokers.auto_puback
        self.address: Address | None = None
        """The address of the last ``connect`` that reached a broker."""
        self.will: Published | None = None
        self.keepalive: int | None = None
        self.connected = False
        self.closed = False
        """Disconnected or dropped: this client is done."""
        self.published: list[Published] = []
        self._mid = 0
        self._connack_due = False
        self._drop_due = False
        self._unacked: dict[int, FakePublishInfo] = {}  # mid -> info, in the order sent
        self._withheld: set[int] = set()
        self._pubacks_due: list[int] = []

    # -- what the test controls ----------------------------------------------------------------
    @property
    def unacked(self) -> list[int]:
        """The message ids sent and not acknowledged yet, oldest first."""
        return list(self._unacked)

    def withhold(self, *mids: int) -> None:
        """Never acknowledge these message ids on its own (sent or still to come)."""
        self._withheld.update(mids)

    def puback(self, *mids: int) -> None:
        """Acknowledge these message ids in the next ``loop``, withheld or not.

        Raises:
            KeyError: a message id that is not waiting for its PUBACK.
        """
        for mid in mids:
            if mid not in self._unacked:
                raise KeyError(f"message id {mid} is not waiting for a PUBACK: {self.unacked}")
            self._withheld.discard(mid)
            self._pubacks_due.append(mid)

    def drop(self) -> None:
        """The connection breaks (a broker killed, a cable pulled); the next ``loop`` says so."""
        self._drop_due = True

    def seq_of(self, mid: int) -> int:
        """The ``seq`` of the reading published with this message id.

        Raises:
            LookupError: no reading was published with it.
        """
        for p in self.published:
            if p.mid == mid and p.topic.startswith("sensors/"):
                return int(p.json()["seq"])
        raise LookupError(f"no reading was published with message id {mid}")

    def mid_of(self, seq: int) -> int:
        """The message id of the last publish of the reading ``seq``.

        Raises:
            LookupError: this client did not publish it.
        """
        for p in reversed(self.published):
            if p.topic.startswith("sensors/") and int(p.json()["seq"]) == seq:
                return p.mid
        raise LookupError(f"reading seq={seq} was not published by this client")

    # -- paho's API, the part the session uses ---------------------------------------------------
    def will_set(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        if self.address is not None:
            raise RuntimeError("will_set after connect: paho sends the Last Will with CONNECT")
        self.will = Published(topic, payload, qos, retain, 0)

    def connect(self, host: str, port: int = 1883, keepalive: int = 60) -> int:
        if self.closed:
            raise RuntimeError("a retired client must not connect again: make a new one")
        address = (host, port)
        self.brokers.attempts.append((time.monotonic(), address))
        if address in self.brokers.unreachable:
            raise ConnectionRefusedError(111, "Connection refused")
        self.address = address
        self.keepalive = keepalive
        self._connack_due = address not in self.brokers.silent
        return mqtt.MQTT_ERR_SUCCESS

    def loop(self, timeout: float = 1.0) -> int:
        if self.closed:
            return mqtt.MQTT_ERR_NO_CONN
        if self._drop_due:
            self._drop_due = False
            self._disconnected("Unspecified error")
            return mqtt.MQTT_ERR_CONN_LOST
        if self._connack_due:
            self._connack_due = False
            assert self.address is not None  # noqa: S101 - set by connect
            code = ConnackCode(self.brokers.connack.get(self.address, 0))
            reason = mqtt.convert_connack_rc_to_reason_code(code)
            self.connected = not reason.is_failure
            if self.on_connect is not None:
                self.on_connect(self, None, mqtt.ConnectFlags(session_present=False), reason, None)
            if reason.is_failure:
                return mqtt.MQTT_ERR_CONN_REFUSED
        if self.auto_puback:
            self._pubacks_due.extend(
                mid
                for mid in self._unacked
                if mid not in self._withheld and mid not in self._pubacks_due
            )
        due, self._pubacks_due = self._pubacks_due, []
        for mid in due:
            info = self._unacked.pop(mid, None)
            if info is None or not self.connected:
                continue
            info.acked = True
            if self.on_publish is not None:
                reason = ReasonCode(PacketTypes.PUBACK)
                # paho passes empty PUBACK properties on MQTT 3.1.1; their constructor is untyped.
                properties = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
                self.on_publish(self, None, mid, reason, properties)
        time.sleep(min(timeout, 0.005))
        return mqtt.MQTT_ERR_SUCCESS

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> FakePublishInfo:
        if qos != 1:
            raise ValueError(f"the fake client models QoS 1 only, not qos={qos}")
        self._mid += 1
        if not self.connected:
            return FakePublishInfo(self._mid, mqtt.MQTT_ERR_NO_CONN)
        info = FakePublishInfo(self._mid, mqtt.MQTT_ERR_SUCCESS)
        self.published.append(Published(topic, bytes(payload), qos, retain, self._mid))
        self._unacked[self._mid] = info
        return info

    def disconnect(self) -> int:
        if self.address is None or self.closed:  # no socket: paho has nothing to disconnect
            self.closed = True
            return mqtt.MQTT_ERR_NO_CONN
        self._disconnected("Success")
        return mqtt.MQTT_ERR_SUCCESS

    def socket(self) -> None:
        """No socket: nothing to close."""
        return

    def _disconnected(self, reason: str) -> None:
        self.connected = False
        self.closed = True
        if self.on_disconnect is not None:
            flags = mqtt.DisconnectFlags(is_disconnect_packet_from_server=False)
            reason_code = ReasonCode(PacketTypes.DISCONNECT, reason)
            self.on_disconnect(self, None, flags, reason_code, None)


if TYPE_CHECKING:  # mypy proves the fake is what the session takes, nothing runs here

    def _is_an_mqtt_client(client: FakeMqttClient) -> MqttClient:
        return client
