"""A RabbitMQ MQTT listener and paho clients in miniature, for driving the agent's session.

The agent takes a ``client_factory``; these fakes stand behind it, so the session logic (the
window, PUBACK timeouts, the Last Will, status messages) runs in milliseconds. The real brokers
are in tests/system/.

* :class:`FakeBroker` with ``refusing`` set swallows a reading's publish (no PUBACK, the
  connection stays open), as RabbitMQ 4.x does for a full queue with ``overflow =
  reject-publish``. Status messages go to another queue and are always acknowledged.
* ``window`` plays paho's ``max_inflight_messages``: a QoS 1 publish beyond it is queued in the
  client (``publish`` still succeeds and returns its message id) and goes out when a PUBACK
  frees a slot, as paho does.
* ``failing`` makes every publish fail at once (a socket that just broke): ``publish`` returns
  ``MQTT_ERR_NO_CONN``, and, as in paho 2.x, ``is_published()`` of a failed publish raises.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode


class FakeBroker:
    def __init__(self, *, window: int | None = None) -> None:
        self.refusing = False
        self.failing = False
        self.window = window
        self.clients: list[FakeClient] = []
        self.stored: list[int] = []  # reading seqs the queue took, in order, duplicates kept
        self.refused: list[int] = []
        self.statuses: list[tuple[FakeClient, dict[str, Any]]] = []  # as they went out
        self.most_outstanding = 0  # the most QoS 1 publishes on the wire at once

    def client(self) -> FakeClient:
        client = FakeClient(self)
        self.clients.append(client)
        return client


class FakeInfo:
    """What ``publish`` returns: the message id, the result, and whether it was acknowledged."""

    def __init__(self, mid: int, rc: int) -> None:
        self.mid = mid
        self.rc = rc
        self.acked = False

    def is_published(self) -> bool:
        if self.rc != mqtt.MQTT_ERR_SUCCESS:  # as paho 2.x does
            raise RuntimeError(f"Message publish failed: {mqtt.error_string(self.rc)}")
        return self.acked


class FakeClient:
    """The part of ``paho.mqtt.client.Client`` the agent drives, for one connection."""

    on_connect: Callable[..., None]
    on_disconnect: Callable[..., None]
    on_publish: Callable[..., None]

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.connected = False
        self.closed = False
        self.will: tuple[str, dict[str, Any], int, bool] | None = None
        self._connack_due = False
        self._acks: list[FakeInfo] = []
        self._queued: list[tuple[str, bytes, FakeInfo]] = []  # beyond the window
        self._outstanding = 0  # sent, PUBACK not yet delivered (or never: refused)
        self._mid = 0
        self.disconnects = 0

    def will_set(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        assert not self.connected, "paho takes the Last Will before CONNECT only"
        self.will = (topic, json.loads(payload), qos, retain)

    def connect(self, _host: str, _port: int, keepalive: int = 60) -> int:
        assert not self.closed, "a retired client must not be used again"
        assert keepalive > 0
        self._connack_due = True
        return mqtt.MQTT_ERR_SUCCESS

    def loop(self, timeout: float = 1.0) -> int:
        if self.closed:
            return mqtt.MQTT_ERR_NO_CONN
        if self._connack_due:
            self._connack_due = False
            self.connected = True
            self.on_connect(self, None, None, ReasonCode(PacketTypes.CONNACK, identifier=0), None)
        acks, self._acks = self._acks, []
        for info in acks:
            info.acked = True
            self._outstanding -= 1
            self.on_publish(
                self, None, info.mid, ReasonCode(PacketTypes.PUBACK, identifier=0), None
            )
        while self._queued and self._has_room():
            topic, payload, info = self._queued.pop(0)
            self._transmit(topic, payload, info)
        time.sleep(min(timeout, 0.005))
        return mqtt.MQTT_ERR_SUCCESS

    def _has_room(self) -> bool:
        return self.broker.window is None or self._outstanding < self.broker.window

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> FakeInfo:
        assert qos == 1
        assert retain == topic.startswith("status/")
        assert not self.closed
        self._mid += 1
        ok = self.connected and not self.broker.failing
        info = FakeInfo(self._mid, mqtt.MQTT_ERR_SUCCESS if ok else mqtt.MQTT_ERR_NO_CONN)
        if not ok:
            return info
        if self._has_room() and not self._queued:
            self._transmit(topic, payload, info)
        else:
            self._queued.append((topic, payload, info))
        return info

    def _transmit(self, topic: str, payload: bytes, info: FakeInfo) -> None:
        self._outstanding += 1
        self.broker.most_outstanding = max(self.broker.most_outstanding, self._outstanding)
        if topic.startswith("sensors/"):
            seq = int(json.loads(payload)["seq"])
            if self.broker.refusing:
                self.broker.refused.append(seq)
                return  # no PUBACK, ever: MQTT 3.1.1 has no way to say no
            self.broker.stored.append(seq)
        else:
            self.broker.statuses.append((self, json.loads(payload)))
        self._acks.append(info)

    def disconnect(self) -> int:
        self.disconnects += 1
        self.connected = False
        self.closed = True
        self.on_disconnect(self, None, None, ReasonCode(PacketTypes.DISCONNECT, identifier=0), None)
        return mqtt.MQTT_ERR_SUCCESS

    def socket(self) -> Any:
        return None
