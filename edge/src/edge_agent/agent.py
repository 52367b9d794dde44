"""The agent: samplers write readings into the outbox; one MQTT session drains it.

* One sampler thread per sensor reads at its interval and writes each reading into the
  outbox before anything else happens to it. A sensor that fails keeps failing alone: its
  errors are counted and the other samplers go on.
* The main thread owns the MQTT client (paho-mqtt 2.x, its network loop driven from here, so
  callbacks run on this thread). While connected it drains the outbox oldest first, at most
  ``drain_rate_per_s`` a second and ``max_inflight - 1`` unacknowledged readings at a time
  (the last slot of paho's window is kept for status messages; with ``max_inflight = 1`` the
  one slot goes to readings and a status waits behind the reading in flight, which paho queues
  and sends when its PUBACK frees the slot), and deletes a
  row only when the broker's PUBACK for it arrives. A dropped connection is rebuilt with
  capped, jittered back-off; whatever was not acknowledged is sent again (the pipeline
  ignores duplicates by the natural key). Each connection gets a new paho client, so the
  outbox alone decides what is sent again, never paho's own queue of the old connection.
* A PUBACK that does not come is as bad as a dropped connection. MQTT 3.1.1 has no negative
  acknowledgement: RabbitMQ 4.x answers a publish its queue refuses (``overflow =
  reject-publish`` on a full queue, or a memory or disk alarm) with silence and keeps the
  connection open (3.10 closes it). The window would fill with publishes never acknowledged,
  and paho resends them only on a reconnect. So when the oldest unacknowledged publish has
  waited ``mqtt.puback_timeout_s``, the agent counts the episode (kept in the outbox, shown by
  ``edge-agent status``), logs it once and ends the session; the reconnect loop's back-off,
  not reset by such a session, keeps it from hammering a full queue.
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
* On SIGTERM the samplers stop, the session flushes what it can for a few seconds, publishes
  its retained ``offline`` status and disconnects; nothing unacknowledged is lost, it stays
  in the outbox for the next start.
* A damaged outbox (:class:`OutboxCorrupt`: a worn SD card), met by a sampler or by the main
  thread (wherever it is met, the shutdown included), stops the agent the same orderly way,
  without the flush: it logs an error naming the file, counts the readings it could not store
  into the outbox's marker (the recovery adds them to ``dropped_total``), publishes ``offline``
  if connected (a publish that fails never fails the shutdown), and :meth:`Agent.run` raises
  the error, which ``edge-agent run`` turns into exit code 75 (EX_TEMPFAIL). systemd starts
  the agent again, and the outbox recovers what it can at that start (see
  :mod:`edge_agent.outbox`). A sampler never ends on an exception: a sensor that stopped
  silently while the heartbeats went on saying ``online`` would be worse than any error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent import __version__
from edge_agent.clock import ClockSource, KernelClock
from edge_agent.config import AgentConfig, Broker, SensorConfig
from edge_agent.errors import ConfigError, EdgeError, SensorError
from edge_agent.led import StatusLed
from edge_agent.outbox import CLIENT_TOKEN_BYTES, Outbox, OutboxCorrupt, OutboxError
from edge_agent.sensors import Calibrated, Sample, Sensor
from edge_agent.wire import reading_payload, reading_topic, status_payload, status_topic

__all__ = [
    "CONNACK_WAIT_MIN_S",
    "HEALTHY_S",
    "SESSION_BYTES",
    "Agent",
    "Backoff",
    "BrokerRotation",
    "build_sensor",
    "build_sensors",
    "mqtt_client_id",
]

log = logging.getLogger(__name__)

_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
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
    if not _NODE_ID.fullmatch(node):
        raise ValueError(f"node id {node!r} is not 1-64 letters, digits, '_' or '-'")
    if not _TOKEN.fullmatch(token):
        raise ValueError(
            f"the client-id token must be {2 * CLIENT_TOKEN_BYTES} lowercase hex digits"
        )
    return f"{node}-{token}"


def build_sensor(config: SensorConfig, agent: AgentConfig) -> Sensor:
    """The driver for one configured sensor, wrapped with its offset and median filter."""
    sensor: Sensor
    if config.kind == "ds18b20":
        from edge_agent.sensors.ds18b20 import DS18B20  # noqa: PLC0415

        sensor = DS18B20(config.device or config.id, root=agent.w1_root)
        if sensor.id != config.id:
            sensor = _Named(sensor, config.id)
    elif config.kind == "dht22":
        from edge_agent.sensors.dht22 import DHT22  # noqa: PLC0415

        if config.pin is None:
            raise ConfigError(f"sensor {config.id}: a dht22 needs a pin")
        sensor = DHT22(config.id, config.pin)
    elif config.kind == "cpu":
        from edge_agent.sensors.cpu import CPUTemp  # noqa: PLC0415

        sensor = CPUTemp(config.id)
    else:
        from edge_agent.sensors.simulator import Simulated  # noqa: PLC0415

        seed = config.seed if config.seed is not None else sum(map(ord, config.id))
        sensor = Simulated(
            config.id,
            seed=seed,
            humidity=config.humidity,
            dropout_rate=config.dropout_rate,
            spike_rate=config.spike_rate,
        )
    if config.offset_c or config.median_window > 1:
        return Calibrated(sensor, offset_c=config.offset_c, median_window=config.median_window)
    return sensor


class _Named:
    """A sensor published under a friendly id (`kitchen`) instead of its device id."""

    def __init__(self, sensor: Sensor, sensor_id: str) -> None:
        self._sensor = sensor
        self._id = sensor_id

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self._sensor.kind

    def read(self) -> Sample:
        return self._sensor.read()

    def close(self) -> None:
        self._sensor.close()


def build_sensors(agent: AgentConfig) -> list[Sensor]:
    return [build_sensor(s, agent) for s in agent.sensors]


class Backoff:
    """Capped, jittered exponential back-off that resets after a healthy run."""

    def __init__(self, initial: float = 1.0, cap: float = 60.0) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not cryptography

    def short(self) -> float:
        """A wait of the first step's size, jittered; the back-off does not grow."""
        return random.uniform(self.initial / 2, self.initial)  # noqa: S311 - jitter

    def reset(self) -> None:
        self._next = self.initial


class BrokerRotation:
    """Which broker the agent tries next, and how long it waits before trying it.

    The brokers are put in an order of this agent's own, shuffled once (by ``rng``, by default
    the operating system's randomness), so that the Pis of a site, configured alike, start on
    different nodes of the cluster. The agent connects to :attr:`current`; when an attempt
    fails, the broker refuses the CONNACK or a session ends for any reason, :meth:`failed`
    moves on to the next broker in that order and says how long to wait.

    An operator expects a dead node to cost seconds, not the back-off's minute, and a cluster
    that is down not to be hammered. So the wait is short (:meth:`Backoff.short`: half to all
    of ``Backoff.initial``, jittered) while a round is incomplete, and the failure that
    completes a round (one failure per broker, in a row) waits :meth:`Backoff.next`, which
    doubles with each round up to its cap. A session that ran well for :data:`HEALTHY_S`
    starts the count and the back-off over. With one broker every failure completes a round:
    the agent paces its reconnects exactly as it does with a single ``mqtt.host``.
    """

    def __init__(
        self, brokers: Sequence[Broker], backoff: Backoff, *, rng: random.Random | None = None
    ) -> None:
        """Raises ValueError: no brokers."""
        if not brokers:
            raise ValueError("at least one broker is needed")
        order = list(brokers)
        (rng or random.SystemRandom()).shuffle(order)
        self.order: tuple[Broker, ...] = tuple(order)
        self.backoff = backoff
        self._index = 0
        self._failures = 0  # in a row, since the start or the last healthy session

    @property
    def current(self) -> Broker:
        """The broker of the session (or of the attempt) in progress, or of the next one."""
        return self.order[self._index]

    @property
    def failures(self) -> int:
        """Failed attempts and sessions in a row, since the start or the last healthy session."""
        return self._failures

    def failed(self, *, healthy: bool = False) -> float:
        """The current broker failed: move on to the next one; return the wait before it.

        ``healthy``: the session that just ended ran well for :data:`HEALTHY_S` first.
        """
        if healthy:
            self.backoff.reset()
            self._failures = 0
        self._failures += 1
        self._index = (self._index + 1) % len(self.order)
        if self._failures % len(self.order) == 0:
            return self.backoff.next()
        return self.backoff.short()


@dataclass
class _Counters:
    read_errors: dict[str, int]
    readings: int = 0
    not_stored: int = 0  # readings lost because the outbox could not store them


class _Sampler(threading.Thread):
    """Reads one sensor at its interval into the outbox, until stopped."""

    def __init__(
        self,
        sensor: Sensor,
        interval_s: float,
        *,
        outbox: Outbox,
        clock: ClockSource,
        counters: _Counters,
        lock: threading.Lock,
        stop: threading.Event,
        on_corrupt: Callable[[OutboxCorrupt], None] | None = None,
    ) -> None:
        """``on_corrupt`` is told of a damaged outbox (the agent stops on it)."""
        super().__init__(name=f"sampler-{sensor.id}", daemon=True)
        self.sensor = sensor
        self.interval_s = interval_s
        self.outbox = outbox
        self.clock = clock
        self.counters = counters
        self.lock = lock
        self.stop = stop
        self.on_corrupt = on_corrupt
        self._failing = False
        self._storing_failed = False

    def run(self) -> None:
        next_due = time.monotonic()
        while not self.stop.wait(max(0.0, next_due - time.monotonic())):
            try:
                self.sample_once()
            except Exception:
                # Whatever it was, this sensor goes on: a sampler that ended would leave the
                # heartbeats saying online while nothing is read.
                log.exception("sampling failed sensor=%s", self.sensor.id)
            next_due += self.interval_s
            now = time.monotonic()
            if next_due < now:  # a slow read: skip the missed slots, keep the rhythm
                next_due = now + self.interval_s - (now - next_due) % self.interval_s

    def sample_once(self) -> None:
        try:
            sample = self.sensor.read()
        except SensorError as exc:
            with self.lock:
                self.counters.read_errors[self.sensor.id] += 1
            if not self._failing:
                log.warning("sensor read failed sensor=%s error=%s", self.sensor.id, exc)
                self._failing = True
            return
        except Exception:
            # A driver bug must not stop this sensor for good, nor the others.
            with self.lock:
                self.counters.read_errors[self.sensor.id] += 1
            log.exception("sensor driver failed sensor=%s", self.sensor.id)
            return
        if self._failing:
            log.info("sensor reads again sensor=%s", self.sensor.id)
            self._failing = False
        try:
            self.outbox.add(
                sensor=self.sensor.id,
                kind=self.sensor.kind,
                temperature_c=sample.temperature_c,
                humidity_pct=sample.humidity_pct,
                wall=self.clock.wall(),
                boot_id=self.clock.boot_id(),
                boottime=self.clock.boottime(),
                synced=self.clock.synchronized(),
            )
        except OutboxCorrupt as exc:  # the agent stops, and its next start recovers the file
            self._not_stored(exc)
            if self.on_corrupt is not None:
                self.on_corrupt(exc)
            return
        except OutboxError as exc:  # a full disk, or a file that cannot be written
            self._not_stored(exc)
            return
        except Exception:
            with self.lock:
                self.counters.not_stored += 1
            if not self._storing_failed:
                log.exception(
                    "readings lost: cannot store them in the outbox sensor=%s", self.sensor.id
                )
                self._storing_failed = True
            return
        if self._storing_failed:
            log.info("outbox stores readings again sensor=%s", self.sensor.id)
            self._storing_failed = False
        with self.lock:
            self.counters.readings += 1

    def _not_stored(self, exc: OutboxError) -> None:
        with self.lock:
            self.counters.not_stored += 1
        if not self._storing_failed:  # once per episode: the count is in the heartbeat
            log.error(
                "readings lost: cannot store them in the outbox sensor=%s error=%s",
                self.sensor.id,
                exc,
            )
            self._storing_failed = True


class Agent:
    """Samplers plus one MQTT session over a durable outbox."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        sensors: Sequence[Sensor] | None = None,
        clock: ClockSource | None = None,
        outbox: Outbox | None = None,
        led: StatusLed | None = None,
        client_factory: Callable[[], mqtt.Client] | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Wire the agent; nothing connects or samples until :meth:`run` (or :meth:`step`).

        ``client_factory`` makes the paho client of each session, ``backoff`` paces the
        reconnects and ``rng`` shuffles the brokers (default: the operating system's
        randomness): tests hand in a fake broker's client, a short back-off, a seeded order.
        """
        self.config = config
        self.node = config.node_id
        self.clock = clock or KernelClock(assume_synced=not config.clock.require_sync)
        self.outbox = outbox or Outbox(
            config.outbox.path,
            max_rows=config.outbox.max_rows,
            max_age_s=config.outbox.max_age_days * 86400,
            clock_synced=self.clock.synchronized(),
        )
        self.client_id = self._client_id()
        self.sensors = list(sensors) if sensors is not None else build_sensors(config)
        intervals = {s.id: s.interval_s for s in config.sensors}
        self._intervals = [intervals.get(s.id, 30.0) for s in self.sensors]
        self.led = led or StatusLed(config.led_pin)
        self._client_factory = client_factory or self._new_client
        self._lock = threading.Lock()
        self.counters = _Counters(read_errors={s.id: 0 for s in self.sensors})
        self._sampling_stop = threading.Event()
        self._samplers: list[_Sampler] = []
        self._started = time.monotonic()
        # session state, touched only by the main thread (paho callbacks run there too)
        self._client: mqtt.Client | None = None
        self.session: str | None = None  # the current client's session id (see _try_connect)
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
        self._backoff = backoff or Backoff()
        self.brokers = BrokerRotation(config.mqtt.brokers, self._backoff, rng=rng)
        self._awaiting_connack = False  # connect() went through; no CONNACK yet
        self._next_attempt = 0.0
        self._connected_since = 0.0
        self._last_heartbeat = 0.0
        self._last_housekeeping = 0.0
        self._last_bounds = 0.0
        self.published = 0
        self.acknowledged = 0
        # sessions ended because PUBACKs were withheld, and the publishes left waiting in them
        self.puback_timeouts = 0
        self.puback_timeout_publishes = 0
        self._puback_timeouts_unsaved: list[int] = []  # outstanding counts not yet in the outbox
        self._delete_failing = False
        self._not_stored_persisted = 0
        # A damaged outbox, from any thread: the first one seen, and the flag the loop watches.
        self._corrupt: OutboxCorrupt | None = None
        self._corrupt_seen = threading.Event()

    # -- MQTT client ---------------------------------------------------------------------------
    @property
    def broker(self) -> Broker:
        """The broker the agent is connected to, or is trying, or tries next."""
        return self.brokers.current

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
        m = self.config.mqtt
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
        self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
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
            self.session,
            self.outbox.depth(),
        )
        self._publish_status()

    def _on_disconnect(
        self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
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

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: ReasonCode, _p: Any) -> None:
        self._sent_at.pop(mid, None)
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self._inflight_seqs.discard(seq)
            self._acked.append(seq)

    def _check_pubacks(self) -> None:
        """End the session when the oldest unacknowledged publish has waited too long.

        No reading leaves the outbox here: the unacknowledged ones are simply sent again by
        the next session (the pipeline drops the duplicates of any that did arrive).
        """
        if not self._sent_at:
            return
        oldest = next(iter(self._sent_at.values()))
        waited = time.monotonic() - oldest
        if waited < self.config.mqtt.puback_timeout_s:
            return
        outstanding = len(self._sent_at)
        readings = len(self._inflight)
        oldest_seq = next(iter(self._inflight.values()), None)
        self.puback_timeouts += 1
        self.puback_timeout_publishes += outstanding
        self._puback_timeouts_unsaved.append(outstanding)
        try:
            self._save_puback_timeouts()
        except OutboxCorrupt as exc:  # the agent stops at the next turn; the session ends now
            self._outbox_corrupt(exc)
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
            self.config.mqtt.puback_timeout_s,
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
    def _close_client(client: mqtt.Client) -> None:
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

    def _save_puback_timeouts(self) -> None:
        """Add the episodes not yet in the outbox to its totals (oldest first)."""
        while self._puback_timeouts_unsaved:
            self.outbox.count_puback_timeout(
                self._puback_timeouts_unsaved[0], now_wall=self.clock.wall()
            )
            self._puback_timeouts_unsaved.pop(0)

    def _try_connect(self) -> None:
        m = self.config.mqtt
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
            # factory, the agent's own callbacks drive it and its Last Will speaks for it.
            self.session = secrets.token_hex(SESSION_BYTES)
            client = self._client_factory()
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.will_set(
                status_topic(self.node),
                status_payload(node=self.node, state="offline", session=self.session),
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

    # -- the loop ------------------------------------------------------------------------------
    def start_sampling(self) -> None:
        for sensor, interval in zip(self.sensors, self._intervals, strict=True):
            sampler = _Sampler(
                sensor,
                interval,
                outbox=self.outbox,
                clock=self.clock,
                counters=self.counters,
                lock=self._lock,
                stop=self._sampling_stop,
                on_corrupt=self._outbox_corrupt,
            )
            sampler.start()
            self._samplers.append(sampler)

    @property
    def outbox_corrupt(self) -> OutboxCorrupt | None:
        """The damage that stopped (or is stopping) the agent, if any."""
        return self._corrupt

    def _outbox_corrupt(self, exc: OutboxCorrupt) -> None:
        """Note a damaged outbox (from any thread): the main loop stops at its next turn."""
        with self._lock:
            if self._corrupt is None:
                self._corrupt = exc
        self._corrupt_seen.set()

    def run(self, stop: threading.Event) -> None:
        """Sample and publish until ``stop`` is set; then shut down in order.

        Raises:
            OutboxCorrupt: the outbox is damaged; the agent has stopped in order (``offline``
                published if it was connected). The next start recovers the file.
        """
        if self.config.clock.require_sync and not self.clock.synchronized():
            log.warning(
                "system clock not synchronised: readings are held until NTP syncs "
                "(timedatectl shows 'System clock synchronized: no')"
            )
        try:
            self.start_sampling()
            log.info(
                "agent started node=%s sensors=%s outbox=%s depth=%d",
                self.node,
                ",".join(s.id for s in self.sensors),
                self.outbox.path,
                self.outbox.depth(),
            )
            while not stop.is_set() and not self._corrupt_seen.is_set():
                self.step()
        except OutboxCorrupt as exc:
            self._outbox_corrupt(exc)
        finally:
            if self._corrupt is not None:
                log.error(
                    "outbox damaged: stopping, the next start keeps the file aside and recovers "
                    "what it can (exit code 75 for systemd to restart the agent) path=%s error=%s",
                    self.outbox.path,
                    self._corrupt,
                )
            self.shutdown()
        if self._corrupt is not None:
            raise self._corrupt

    def step(self, timeout: float = 0.05) -> None:
        """One turn: network I/O, draining, acknowledgements, housekeeping.

        A damaged outbox does not raise here: it is noted (:attr:`outbox_corrupt`), and
        :meth:`run` stops at its next turn.
        """
        try:
            self._step(timeout)
        except OutboxCorrupt as exc:
            self._outbox_corrupt(exc)

    def _step(self, timeout: float) -> None:
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
        if self.connected:
            self._check_pubacks()
        if self.connected:
            self._drain()
        self._flush_acks()
        self._housekeeping()

    def _drain(self) -> None:
        client = self._client  # a failed write may end the session (and retire it) mid-batch
        assert client is not None  # noqa: S101 - connected implies a client
        now = time.monotonic()
        rate = self.config.outbox.drain_rate_per_s
        self._tokens = min(rate, self._tokens + (now - self._last_refill) * rate)
        self._last_refill = now
        # Keep one slot of paho's window for status messages, unless it has only one: then a
        # status waits behind the reading in flight (paho queues what is beyond its window).
        window = self.config.mqtt.max_inflight
        room = (window - 1 if window > 1 else window) - len(self._inflight)
        want = min(room, int(self._tokens))
        if want <= 0:
            return
        for row in self.outbox.pending(self._cursor, want):
            if row.seq in self._inflight_seqs:  # a re-scan after held readings were released
                self._cursor = row.seq
                continue
            payload = reading_payload(
                node=self.node,
                sensor=row.sensor,
                kind=row.kind,
                seq=row.seq,
                ts=row.ts,
                temperature_c=row.temperature_c,
                humidity_pct=row.humidity_pct,
                time_uncertain=row.uncertain,
            )
            info = client.publish(reading_topic(self.node, row.sensor), payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS or not self.connected:
                break
            self._sent_at[info.mid] = now
            self._inflight[info.mid] = row.seq
            self._inflight_seqs.add(row.seq)
            self._cursor = row.seq
            self._tokens -= 1
            self.published += 1

    def _flush_acks(self) -> None:
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

    def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now - self._last_housekeeping >= 1.0:
                self._last_housekeeping = now
                self._resolve_clock()
                self._update_led()
                self._persist_not_stored()
                self._save_puback_timeouts()
            if now - self._last_bounds >= 60.0:
                self._last_bounds = now
                self._enforce_bounds()
        except OutboxCorrupt:
            raise
        except OutboxError as exc:  # a full disk must not stop the agent; it is retried
            log.debug("outbox housekeeping failed: %s", exc)
        if self.connected and now - self._last_heartbeat >= self.config.heartbeat_s:
            self._publish_status()

    def _enforce_bounds(self) -> None:
        too_old, beyond = self.outbox.enforce_bounds(
            self.clock.wall(),
            synced=self.clock.synchronized(),
            boot_id=self.clock.boot_id(),
            boottime=self.clock.boottime(),
        )
        if too_old:
            log.warning(
                "outbox: dropped readings older than outbox.max_age_days=%g count=%d",
                self.config.outbox.max_age_days,
                too_old,
            )
        if beyond:
            log.warning(
                "outbox full: dropped the oldest readings beyond outbox.max_rows=%d count=%d",
                self.config.outbox.max_rows,
                beyond,
            )

    def _persist_not_stored(self) -> None:
        """Fold readings the outbox could not store into its persisted dropped total."""
        with self._lock:
            pending = self.counters.not_stored - self._not_stored_persisted
        if pending:
            self.outbox.count_dropped(pending)
            self._not_stored_persisted += pending

    def _resolve_clock(self) -> None:
        synced = self.clock.synchronized()
        corrected, flagged = self.outbox.resolve_held(
            synced=synced,
            now_wall=self.clock.wall(),
            boot_id=self.clock.boot_id(),
            boottime=self.clock.boottime(),
            hold_max_s=self.config.clock.hold_max_s,
        )
        if corrected or flagged:
            # Released readings are older than what was already sent: scan from the start.
            self._cursor = 0
        if corrected:
            log.info("clock synchronised: corrected the times of held readings count=%d", corrected)
        if flagged:
            log.warning(
                "clock never synchronised in time: sending held readings flagged "
                "time_uncertain count=%d",
                flagged,
            )

    def _update_led(self) -> None:
        try:
            if self.connected and not self._inflight and self.outbox.depth() < 10:
                self.led.connected()
            else:
                self.led.buffering()
        except OutboxCorrupt:
            raise
        except Exception:  # an LED must never stop the agent
            log.debug("status LED failed", exc_info=True)

    def _status(self, state: str) -> bytes:
        with self._lock:
            errors = dict(self.counters.read_errors)
        return status_payload(
            node=self.node,
            state=state,
            session=self.session,
            ts=self.clock.wall() if self.clock.synchronized() else None,
            agent_version=__version__,
            uptime_s=time.monotonic() - self._started,
            outbox_depth=self.outbox.depth(),
            dropped=self.outbox.dropped_total()
            + self.counters.not_stored
            - self._not_stored_persisted,
            read_errors=errors,
        )

    def _publish_status(self) -> None:
        if self._client is None:
            return
        self._last_heartbeat = time.monotonic()
        payload = self._status("online")
        info = self._client.publish(status_topic(self.node), payload, qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS and self.connected:
            self._sent_at[info.mid] = self._last_heartbeat
        try:
            self.outbox.set_meta("read_errors", json.dumps(self.counters.read_errors))
        except OutboxCorrupt:
            raise
        except EdgeError:
            pass

    # -- shutdown ------------------------------------------------------------------------------
    def _save_counts(self) -> None:
        """Keep what the agent counted but did not write yet (the samplers have stopped).

        With a damaged outbox, the readings not stored go into its marker instead, and the
        recovery at the next start adds them to ``dropped_total``.
        """
        if self._corrupt is None:
            try:
                self._persist_not_stored()
                self._save_puback_timeouts()
            except OutboxCorrupt as exc:
                self._outbox_corrupt(exc)
            except OutboxError as exc:
                log.warning("cannot save the counts into the outbox at shutdown: %s", exc)
        if self._corrupt is None:
            return
        with self._lock:
            pending = self.counters.not_stored - self._not_stored_persisted
        try:
            self.outbox.note_not_stored(pending)
        except OutboxError as exc:
            log.error(  # noqa: TRY400 - the message is the whole story
                "readings lost and not counted: %s count=%d", exc, pending
            )
        else:
            self._not_stored_persisted += pending

    def _announce_offline(self) -> None:
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
                status_payload(node=self.node, state="offline", session=self.session),
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

    def shutdown(self) -> None:
        """Stop sampling, flush for a few seconds, announce ``offline``, close everything.

        With a damaged outbox there is nothing to flush: the acknowledgements still arriving
        could not be recorded, and the readings are sent again after the recovery.
        """
        self._sampling_stop.set()
        for sampler in self._samplers:
            sampler.join(5)
        try:
            deadline = time.monotonic() + self.config.shutdown_flush_s
            while self.connected and time.monotonic() < deadline and self._corrupt is None:
                if not self._inflight and not self.outbox.pending(self._cursor, 1):
                    break
                self.step(0.02)
            if self._corrupt is None:
                self._flush_acks()
        except OutboxCorrupt as exc:
            self._outbox_corrupt(exc)
        self._save_counts()
        self._announce_offline()
        left: int | None = None
        if self._corrupt is None:
            try:
                left = self.outbox.depth()
            except OutboxCorrupt as exc:
                self._outbox_corrupt(exc)
            except OutboxError:
                pass
        log.info(
            "agent stopped published=%d acknowledged=%d left_in_outbox=%s puback_timeouts=%d",
            self.published,
            self.acknowledged,
            "unknown" if left is None else left,
            self.puback_timeouts,
        )
        for sensor in self.sensors:
            with contextlib.suppress(Exception):
                sensor.close()
        with contextlib.suppress(Exception):
            self.led.close()
        self.outbox.close()
