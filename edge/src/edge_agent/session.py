"""The MQTT session: one paho-mqtt 2.x client at a time, draining the outbox to the broker.

:class:`Session` owns everything about talking to the broker; :class:`edge_agent.agent.Agent`
decides when each step runs (its main thread drives the client's network loop, so paho's
callbacks run on that thread too) and keeps sampling, housekeeping and shutdown.

* While connected the session drains the outbox oldest first, at most ``drain_rate_per_s`` a
  second and ``max_inflight - 1`` unacknowledged readings at a time (the last slot of paho's
  window is kept for status messages; with ``max_inflight = 1`` the one slot goes to readings
  and a status waits behind the reading in flight, which paho queues and sends when its PUBACK
  frees the slot), and deletes a row only when the broker's PUBACK for it arrives. A dropped
  connection is rebuilt with capped, jittered back-off; whatever was not acknowledged is sent
  again (the pipeline ignores duplicates by the natural key). Each connection gets a new paho
  client, so the outbox alone decides what is sent again, never paho's own queue of the old
  connection.
* A PUBACK that does not come is as bad as a dropped connection. MQTT 3.1.1 has no negative
  acknowledgement: RabbitMQ 4.x answers a publish its queue refuses (``overflow =
  reject-publish`` on a full queue, or a memory or disk alarm) with silence and keeps the
  connection open (3.10 closes it). The window would fill with publishes never acknowledged,
  and paho resends them only on a reconnect. So when the oldest unacknowledged publish has
  waited ``mqtt.puback_timeout_s``, the session counts the episode (kept in the outbox, shown
  by ``edge-agent status``), logs it once and ends; the reconnect loop's back-off, not reset by
  such a session, keeps it from hammering a full queue.
* The agent knows one broker or several (``mqtt.hosts``: the nodes of a RabbitMQ cluster,
  each taking MQTT connections). It starts on a random one of them, so that a site's Pis
  spread over the nodes, and whenever a connection attempt fails, a CONNACK refuses it or a
  session ends (a lost connection, withheld PUBACKs), it tries another, in an order of its
  own. A broker that dies costs a short jittered wait, not the back-off's minute; the back-off
  grows only when a whole round of brokers failed (see :class:`BrokerRotation`). Nothing is
  lost in the move: the new session sends everything the outbox still holds, that is
  everything not acknowledged, whichever broker it went to. TLS uses the same CA (and client
  certificate) for every broker and checks each broker's certificate against the host name
  or address the agent connects to.
* The MQTT session is clean (``clean_session=True``): the broker keeps nothing for the agent
  between connections, because the outbox already keeps everything not yet acknowledged. The
  client id is ``<node>-<token>``, the token 128 random bits kept in the outbox
  (:meth:`Outbox.client_token`): RabbitMQ closes an existing connection when another one
  arrives with the same client id, whatever its user, so a client id another node could guess
  would let that node knock this one off the broker and fire its Last Will.
* Every connection has its own session id (16 random hex digits), carried by its Last Will,
  its retained ``online``, its heartbeats and its clean-shutdown ``offline``: the pipeline
  applies an ``offline`` only to the connection it belongs to, so the Last Will of an old
  connection that arrives after the node reconnected cannot mark it offline.

The client comes from a factory (by default the real paho client, configured from
``mqtt.*``); tests hand in :class:`edge_agent.testing.FakeBrokers` instead. The session uses
only the part of paho's ``Client`` that :class:`MqttClient` names.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.clock import ClockSource
from edge_agent.config import Broker, MqttConfig
from edge_agent.outbox import CLIENT_TOKEN_BYTES, Outbox, OutboxCorrupt, OutboxError
from edge_agent.reconnect import Backoff, BrokerRotation
from tempmon_contract.ids import ID, ID_RULE, reading_topic, status_topic
from tempmon_contract.wire import reading_payload, status_payload

__all__ = [
    "CONNACK_WAIT_MIN_S",
    "HEALTHY_S",
    "SESSION_BYTES",
    "MqttClient",
    "PublishInfo",
    "Session",
    "mqtt_client_id",
]

# The session's lines keep the logger name they had before it left edge_agent.agent: the log
# format shows it, and operators filter the journal by it.
log = logging.getLogger("edge_agent.agent")

_TOKEN = re.compile(rf"[0-9a-f]{{{2 * CLIENT_TOKEN_BYTES}}}")
SESSION_BYTES = 8
"""Random bytes in a connection's session id: 64 bits, 16 lowercase hex digits on the wire."""
HEALTHY_S = 60.0
"""A session that ran well this long resets the back-off (and the round of failed brokers)."""
CONNACK_WAIT_MIN_S = 10.0
"""How long a connection waits for its CONNACK, at least (else ``mqtt.keepalive_s``)."""


def mqtt_client_id(node: str, token: str) -> str:
    """The agent's MQTT client id: ``<node>-<token>``, at most 97 characters.

    The node id keeps the connection recognisable in the broker's connection list; the token
    (32 hex digits, 128 random bits, see :meth:`Outbox.client_token`) makes it impossible for
    another node to guess, so nobody else's connection can take its place. RabbitMQ 3.10 and
    4.x accept client ids of this length (MQTT 3.1.1 lets a server accept more than 23 bytes).

    Raises:
        ValueError: the node id is not 1-64 letters, digits, '_' or '-', or the token is not
            32 lowercase hex digits (the message never shows the token).
    """
    if not ID.fullmatch(node):
        raise ValueError(f"node id {node!r} is not {ID_RULE}")
    if not _TOKEN.fullmatch(token):
        raise ValueError(
            f"the client-id token must be {2 * CLIENT_TOKEN_BYTES} lowercase hex digits"
        )
    return f"{node}-{token}"


class PublishInfo(Protocol):
    """What :meth:`MqttClient.publish` returns: paho's ``MQTTMessageInfo``, as far as used."""

    @property
    def mid(self) -> int: ...

    @property
    def rc(self) -> int: ...

    def is_published(self) -> bool:
        """Whether the PUBACK came. Raises (paho 2.x) when the publish itself failed."""
        ...


class _Socket(Protocol):
    def close(self) -> None: ...


class MqttClient(Protocol):
    """The part of ``paho.mqtt.client.Client`` (callback API version 2) the session uses.

    :class:`edge_agent.testing.FakeMqttClient` implements exactly this much.
    """

    on_connect: Callable[..., None] | None
    on_disconnect: Callable[..., None] | None
    on_publish: Callable[..., None] | None

    def will_set(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """The Last Will, taken before ``connect`` only."""
        ...

    def connect(self, host: str, port: int = 1883, keepalive: int = 60) -> int:
        """Open the connection and send CONNECT. Raises OSError / ssl.SSLError: unreachable."""
        ...

    def loop(self, timeout: float = 1.0) -> int:
        """Network I/O; runs the callbacks on the calling thread."""
        ...

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> PublishInfo: ...

    def disconnect(self) -> int: ...

    def socket(self) -> _Socket | None: ...


class Session:
    """One MQTT connection at a time to one of the brokers, draining the outbox.

    Every method runs on the thread that drives :meth:`poll` (paho's callbacks run there too).
    A step of the owner is, in this order: :meth:`poll` (connect when due, network I/O), and
    while :attr:`connected` :meth:`check_pubacks` and :meth:`drain`, then :meth:`flush_acks`.

    ``on_connected`` runs when a CONNACK accepted a connection (the agent publishes its
    ``online`` status then); ``on_corrupt`` is told of a damaged outbox met where the session
    must not raise (the PUBACK timeout ends the session first).
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        node: str,
        outbox: Outbox,
        clock: ClockSource,
        drain_rate_per_s: float,
        client_factory: Callable[[], MqttClient] | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        on_connected: Callable[[], None] | None = None,
        on_corrupt: Callable[[OutboxCorrupt], None] | None = None,
    ) -> None:
        """Nothing connects until :meth:`poll`.

        Raises:
            OutboxCorrupt: the outbox is damaged (reading its client-id token).
            ValueError: no brokers.
        """
        self.config = config
        self.node = node
        self.outbox = outbox
        self.clock = clock
        self.drain_rate_per_s = drain_rate_per_s
        self.client_id = self._client_id()
        self._client_factory = client_factory or self._new_client
        self._on_connected = on_connected
        self._on_corrupt = on_corrupt
        self._client: MqttClient | None = None
        self.session_id: str | None = None  # the current client's session id (see _try_connect)
        self.connected = False
        self._inflight: dict[int, int] = {}  # mid -> seq, readings of this session
        self._inflight_seqs: set[int] = set()
        # mid -> when sent, every QoS 1 publish of this session (readings and status), oldest
        # first: a dict keeps insertion order, and an acknowledgement only removes entries.
        self._sent_at: dict[int, float] = {}
        self._acked: list[int] = []
        self._cursor = 0
        self._tokens = 0.0
        self._last_refill = time.monotonic()
        self.brokers = BrokerRotation(config.brokers, backoff or Backoff(), rng=rng)
        self._awaiting_connack = False  # connect() went through; no CONNACK yet
        self._next_attempt = 0.0
        self._connected_since = 0.0
        self.published = 0
        self.acknowledged = 0
        # sessions ended because PUBACKs were withheld, and the publishes left waiting in them
        self.puback_timeouts = 0
        self.puback_timeout_publishes = 0
        self._puback_timeouts_unsaved: list[int] = []  # outstanding counts not yet in the outbox
        self._delete_failing = False

    # -- what the owner reads ----------------------------------------------------------------
    @property
    def broker(self) -> Broker:
        """The broker the session is connected to, or is trying, or tries next."""
        return self.brokers.current

    @property
    def client(self) -> MqttClient | None:
        """The current connection's client (a new one for each connection), if any."""
        return self._client

    @property
    def in_flight(self) -> int:
        """Readings published in this connection and not acknowledged yet."""
        return len(self._inflight)

    def drained(self) -> bool:
        """Nothing in flight and nothing left in the outbox to send in this connection."""
        return not self._inflight and not self.outbox.pending(self._cursor, 1)

    # -- the client --------------------------------------------------------------------------
    def _client_id(self) -> str:
        """``<node>-<token>`` with the outbox's token; a token for this run if it cannot be kept.

        Without a stored token (a full disk at the very first start) the agent still must not
        fall back to a guessable id: it uses a new random token until the next start, which
        costs nothing but a changed client id (the session is clean).
        """
        try:
            token = self.outbox.client_token()
        except OutboxCorrupt:
            raise
        except OutboxError as exc:
            log.warning(
                "cannot keep the MQTT client id in the outbox (%s): using a new random one "
                "for this run",
                exc,
            )
            token = secrets.token_hex(CLIENT_TOKEN_BYTES)
        return mqtt_client_id(self.node, token)

    def _new_client(self) -> mqtt.Client:
        m = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            # Clean: the outbox, not the broker, keeps what is unacknowledged (see above).
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if m.username is not None:
            client.username_pw_set(m.username, m.password)
        if m.ca_file is not None:
            client.tls_set(
                ca_certs=str(m.ca_file),
                certfile=str(m.cert_file) if m.cert_file else None,
                keyfile=str(m.key_file) if m.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        # paho walks its in-flight list on every acknowledgement: a small window is faster.
        client.max_inflight_messages_set(m.max_inflight)
        return client

    def _on_connect(
        self, client: MqttClient, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            broker = self.broker
            delay = self._lost(f"refused: {reason}", quiet=True)
            log.error(
                "broker refused the connection host=%s port=%d reason=%s: check the node's "
                "user and password on the gateway (users.sh node %s) next=%s retry_in_s=%.1f",
                broker.host,
                broker.port,
                reason,
                self.node,
                self.broker,
                delay,
            )
            self._close_client(client)
            return
        self.connected = True
        self._awaiting_connack = False
        self._connected_since = time.monotonic()
        self._cursor = 0  # resend everything not yet acknowledged
        self._inflight.clear()
        self._inflight_seqs.clear()
        self._sent_at.clear()
        log.info(
            "connected host=%s port=%d session=%s outbox_depth=%d",
            self.broker.host,
            self.broker.port,
            self.session_id,
            self.outbox.depth(),
        )
        if self._on_connected is not None:
            self._on_connected()

    def _on_disconnect(
        self, client: MqttClient, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if client is not self._client:  # a retired session's client closing: already handled
            return
        self._lost(str(reason))

    def _lost(
        self, reason: str, *, healthy_until: float | None = None, quiet: bool = False
    ) -> float:
        """End the session's bookkeeping and schedule the next connection; return its delay.

        The paho client is retired with the session: the next connection gets a new one, so
        the publishes paho still holds for the old connection are not sent a second time next
        to the outbox's copies. The next connection goes to another broker, when there are
        several (:class:`BrokerRotation`). The back-off resets only after a session that ran
        well for :data:`HEALTHY_S` until ``healthy_until`` (default: now); a session that
        stalled on withheld PUBACKs was not healthy from the moment its oldest unacknowledged
        publish was sent.
        """
        was = self.connected
        broker = self.broker
        now = time.monotonic()
        self.connected = False
        self._awaiting_connack = False
        self._client = None
        self._inflight.clear()
        self._inflight_seqs.clear()
        self._sent_at.clear()
        healthy_for = (now if healthy_until is None else healthy_until) - self._connected_since
        delay = self.brokers.failed(healthy=was and healthy_for > HEALTHY_S)
        self._next_attempt = now + delay
        if not quiet:
            log.warning(
                "%s host=%s port=%d reason=%s next=%s retry_in_s=%.1f",
                "disconnected" if was else "connection closed before the CONNACK",
                broker.host,
                broker.port,
                reason,
                self.broker,
                delay,
            )
        return delay

    def _on_publish(self, _c: MqttClient, _u: Any, mid: int, _reason: ReasonCode, _p: Any) -> None:
        self._sent_at.pop(mid, None)
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self._inflight_seqs.discard(seq)
            self._acked.append(seq)

    def check_pubacks(self) -> None:
        """End the session when the oldest unacknowledged publish has waited too long.

        No reading leaves the outbox here: the unacknowledged ones are simply sent again by
        the next session (the pipeline drops the duplicates of any that did arrive).
        """
        if not self._sent_at:
            return
        oldest = next(iter(self._sent_at.values()))
        waited = time.monotonic() - oldest
        if waited < self.config.puback_timeout_s:
            return
        outstanding = len(self._sent_at)
        readings = len(self._inflight)
        oldest_seq = next(iter(self._inflight.values()), None)
        self.puback_timeouts += 1
        self.puback_timeout_publishes += outstanding
        self._puback_timeouts_unsaved.append(outstanding)
        try:
            self.save_puback_timeouts()
        except OutboxCorrupt as exc:  # the agent stops at the next turn; the session ends now
            if self._on_corrupt is not None:
                self._on_corrupt(exc)
        except OutboxError:  # a full disk: housekeeping tries again
            pass
        client = self._client
        broker = self.broker
        delay = self._lost("puback timeout", healthy_until=oldest, quiet=True)
        log.warning(
            "broker withholding acknowledgements host=%s port=%d: no PUBACK for %.0f s "
            "(mqtt.puback_timeout_s=%g) unacknowledged=%d readings=%d oldest_seq=%s "
            "puback_timeouts=%d: likely a full queue (overflow reject-publish) or a broker "
            "alarm (memory or disk), check the queue's length and `rabbitmq-diagnostics "
            "alarms` on the gateway; the readings stay in the outbox and are sent again after "
            "reconnecting next=%s retry_in_s=%.1f",
            broker.host,
            broker.port,
            waited,
            self.config.puback_timeout_s,
            outstanding,
            readings,
            oldest_seq,
            self.puback_timeouts,
            self.broker,
            delay,
        )
        if client is not None:
            self._close_client(client)

    @staticmethod
    def _close_client(client: MqttClient) -> None:
        """Disconnect a retired session's client, and be sure its socket is closed.

        A DISCONNECT makes the broker discard the Last Will: the node is not offline, it is
        only starting a new session. A broker that stopped reading (a memory alarm blocks
        publishers) may never take the DISCONNECT; the socket is closed all the same, and the
        broker then publishes the Last Will until the next session's ``online``.
        """
        with contextlib.suppress(Exception):
            client.disconnect()
        with contextlib.suppress(Exception):
            sock = client.socket()
            if sock is not None:
                sock.close()

    def save_puback_timeouts(self) -> None:
        """Add the episodes not yet in the outbox to its totals (oldest first).

        Raises:
            OutboxError: the outbox cannot be written (the episodes stay to be saved later).
        """
        while self._puback_timeouts_unsaved:
            self.outbox.count_puback_timeout(
                self._puback_timeouts_unsaved[0], now_wall=self.clock.wall()
            )
            self._puback_timeouts_unsaved.pop(0)

    def _try_connect(self) -> None:
        m = self.config
        if self._client is not None and self._awaiting_connack:
            # The connection went through but no CONNACK came (a broker that accepts TCP and
            # then hangs): give up on this broker as on a failed attempt.
            client, broker = self._client, self.broker
            delay = self._lost("no CONNACK", quiet=True)
            log.warning(
                "no CONNACK from the broker within %g s host=%s port=%d next=%s retry_in_s=%.1f",
                max(m.keepalive_s, CONNACK_WAIT_MIN_S),
                broker.host,
                broker.port,
                self.broker,
                delay,
            )
            self._close_client(client)
            return
        if self._client is None:
            # A new client for each session (see _lost), with a new session id; whatever the
            # factory, the session's own callbacks drive it and its Last Will speaks for it.
            self.session_id = secrets.token_hex(SESSION_BYTES)
            client = self._client_factory()
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.will_set(
                status_topic(self.node),
                status_payload(node=self.node, state="offline", session=self.session_id),
                qos=1,
                retain=True,
            )
            self._client = client
        broker = self.broker
        try:
            self._client.connect(broker.host, broker.port, keepalive=m.keepalive_s)
        except (OSError, ssl.SSLError) as exc:
            # The same client (and session id) tries the next broker: nothing was sent yet.
            delay = self.brokers.failed()
            self._next_attempt = time.monotonic() + delay
            log.warning(
                "broker unreachable host=%s port=%d next=%s retry_in_s=%.1f error=%s",
                broker.host,
                broker.port,
                self.broker,
                delay,
                exc,
            )
            return
        # The CONNACK arrives through the loop; until then do not try again.
        self._awaiting_connack = True
        self._next_attempt = time.monotonic() + max(m.keepalive_s, CONNACK_WAIT_MIN_S)

    # -- the owner's steps -------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        """Connect when an attempt is due, then the network I/O (and so the callbacks).

        Without a client, or when the loop fails, it waits ``timeout`` instead.
        """
        now = time.monotonic()
        if not self.connected and now >= self._next_attempt:
            self._try_connect()
        if self._client is not None:
            rc = self._client.loop(timeout=timeout)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if self.connected:  # paho normally reports this through on_disconnect
                    self._lost(mqtt.error_string(rc))
                time.sleep(timeout)
        else:
            time.sleep(timeout)

    def rescan(self) -> None:
        """Send from the outbox's start again: released readings are older than those sent."""
        self._cursor = 0

    def drain(self) -> None:
        """Publish the next readings of the outbox, within the rate limit and the window."""
        client = self._client  # a failed write may end the session (and retire it) mid-batch
        assert client is not None  # noqa: S101 - connected implies a client
        now = time.monotonic()
        rate = self.drain_rate_per_s
        self._tokens = min(rate, self._tokens + (now - self._last_refill) * rate)
        self._last_refill = now
        # Keep one slot of paho's window for status messages, unless it has only one: then a
        # status waits behind the reading in flight (paho queues what is beyond its window).
        window = self.config.max_inflight
        room = (window - 1 if window > 1 else window) - len(self._inflight)
        want = min(room, int(self._tokens))
        if want <= 0:
            return
        for row in self.outbox.pending(self._cursor, want):
            if row.seq in self._inflight_seqs:  # a re-scan after held readings were released
                self._cursor = row.seq
                continue
            try:
                payload = reading_payload(
                    node=self.node,
                    sensor=row.sensor,
                    kind=row.kind,
                    seq=row.seq,
                    ts=row.ts,
                    temperature_c=row.temperature_c,
                    humidity_pct=row.humidity_pct,
                    pressure_hpa=row.pressure_hpa,
                    time_uncertain=row.uncertain,
                )
            except ValueError as exc:
                self._unsendable(row.seq, row.sensor, exc)
                self._cursor = row.seq
                continue
            info = client.publish(reading_topic(self.node, row.sensor), payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS or not self.connected:
                break
            self._sent_at[info.mid] = now
            self._inflight[info.mid] = row.seq
            self._inflight_seqs.add(row.seq)
            self._cursor = row.seq
            self._tokens -= 1
            self.published += 1

    def _unsendable(self, seq: int, sensor: str, exc: ValueError) -> None:
        """A stored reading the contract refuses (one an older agent stored, before values
        were checked against the kind's range): the pipeline would only dead-letter it, and
        sending it again and again would hold up nothing but waste. Deleted and counted in
        ``dropped_total``, with the reason in the log."""
        log.warning(
            "reading dropped: the contract refuses it seq=%d sensor=%s error=%s", seq, sensor, exc
        )
        self.outbox.delete([seq])
        self.outbox.count_dropped(1)

    def flush_acks(self) -> None:
        """Delete the acknowledged readings from the outbox.

        A full disk keeps the acknowledgements for the next call (logged once per episode).

        Raises:
            OutboxCorrupt: the outbox is damaged (the acknowledgements are kept).
        """
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        try:
            self.outbox.delete(acked, now_wall=self.clock.wall())
        except OutboxCorrupt:
            self._acked = acked + self._acked
            raise
        except OutboxError as exc:
            # A full disk: keep the acknowledgements and try again; until then these rows
            # stay (and are sent again after a reconnect, which the pipeline ignores).
            self._acked = acked + self._acked
            if not self._delete_failing:
                log.error(  # noqa: TRY400 - the message is the whole story
                    "cannot delete acknowledged readings from the outbox: %s", exc
                )
                self._delete_failing = True
            return
        if self._delete_failing:
            log.info("outbox writable again")
            self._delete_failing = False
        self.acknowledged += len(acked)

    def publish_status(self, payload: bytes) -> None:
        """Publish a retained status (QoS 1); its PUBACK is awaited like a reading's."""
        if self._client is None:
            return
        sent = time.monotonic()
        info = self._client.publish(status_topic(self.node), payload, qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS and self.connected:
            self._sent_at[info.mid] = sent

    def announce_offline(self) -> None:
        """Publish the retained ``offline`` and disconnect; never fails the shutdown.

        A publish that failed (the socket just broke) is not waited for: paho 2.x raises from
        ``is_published()`` then, and the broker publishes the Last Will anyway.
        """
        client = self._client  # a disconnect retires it from self._client (see _lost)
        if client is None or not self.connected:
            return
        try:
            info = client.publish(
                status_topic(self.node),
                status_payload(node=self.node, state="offline", session=self.session_id),
                qos=1,
                retain=True,
            )
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                end = time.monotonic() + 2
                while not info.is_published() and time.monotonic() < end and self.connected:
                    client.loop(0.02)
            else:
                log.warning(
                    "cannot publish the offline status (the Last Will says it): %s",
                    mqtt.error_string(info.rc),
                )
            client.disconnect()
            client.loop(0.1)
        except Exception:  # the shutdown goes on: its exit code matters more
            log.warning("announcing offline failed", exc_info=True)
