"""The agent: samplers write readings into the outbox; one MQTT session drains it.

* One sampler thread per sensor reads at its interval and writes each reading into the
  outbox before anything else happens to it. A sensor that fails keeps failing alone: its
  errors are counted and the other samplers go on.
* The main thread drives the MQTT session (:class:`edge_agent.session.Session`: one paho-mqtt
  2.x client at a time, its network loop driven from here, so callbacks run on this thread).
  While connected it drains the outbox oldest first, within a rate limit and paho's window,
  and deletes a row only when the broker's PUBACK for it arrives; withheld PUBACKs end the
  session like a dropped connection, and the next connection goes to another broker when
  there are several (:class:`edge_agent.reconnect.BrokerRotation`). Whatever was not
  acknowledged is sent again (the pipeline ignores duplicates by the natural key). The
  session's module says how and why.
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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge_agent import __version__
from edge_agent.clock import ClockSource, KernelClock
from edge_agent.config import AgentConfig, Broker
from edge_agent.errors import EdgeError, SensorError
from edge_agent.led import StatusLed
from edge_agent.outbox import Outbox, OutboxCorrupt, OutboxError
from edge_agent.reconnect import Backoff, BrokerRotation
from edge_agent.sensors import Sensor
from edge_agent.sensors.registry import build_sensor, build_sensors
from edge_agent.session import (
    CONNACK_WAIT_MIN_S,
    HEALTHY_S,
    SESSION_BYTES,
    MqttClient,
    Session,
    mqtt_client_id,
)
from tempmon_contract.wire import status_payload

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
                pressure_hpa=sample.pressure_hpa,
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
        client_factory: Callable[[], MqttClient] | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Wire the agent; nothing connects or samples until :meth:`run` (or :meth:`step`).

        ``client_factory`` makes the paho client of each session, ``backoff`` paces the
        reconnects and ``rng`` shuffles the brokers (default: the operating system's
        randomness): tests hand in a fake broker's client (:mod:`edge_agent.testing`), a short
        back-off, a seeded order.
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
        # Touched only by the main thread (paho's callbacks run there too).
        self.mqtt_session = Session(
            config.mqtt,
            node=self.node,
            outbox=self.outbox,
            clock=self.clock,
            drain_rate_per_s=config.outbox.drain_rate_per_s,
            client_factory=client_factory,
            backoff=backoff,
            rng=rng,
            on_connected=self._publish_status,
            on_corrupt=self._outbox_corrupt,
        )
        self.sensors = list(sensors) if sensors is not None else build_sensors(config)
        intervals = {s.id: s.interval_s for s in config.sensors}
        self._intervals = [intervals.get(s.id, 30.0) for s in self.sensors]
        self.led = led or StatusLed(config.led_pin)
        self._lock = threading.Lock()
        self.counters = _Counters(read_errors={s.id: 0 for s in self.sensors})
        self._sampling_stop = threading.Event()
        self._samplers: list[_Sampler] = []
        self._started = time.monotonic()
        self._last_heartbeat = 0.0
        self._last_housekeeping = 0.0
        self._last_bounds = 0.0
        self._not_stored_persisted = 0
        # A damaged outbox, from any thread: the first one seen, and the flag the loop watches.
        self._corrupt: OutboxCorrupt | None = None
        self._corrupt_seen = threading.Event()

    # -- the session, as the agent's callers knew it ------------------------------------------
    @property
    def client_id(self) -> str:
        """The MQTT client id, ``<node>-<token>`` (see :func:`mqtt_client_id`)."""
        return self.mqtt_session.client_id

    @property
    def connected(self) -> bool:
        return self.mqtt_session.connected

    @property
    def session(self) -> str | None:
        """The current connection's session id, carried by its statuses and Last Will."""
        return self.mqtt_session.session_id

    @property
    def brokers(self) -> BrokerRotation:
        return self.mqtt_session.brokers

    @property
    def broker(self) -> Broker:
        """The broker the agent is connected to, or is trying, or tries next."""
        return self.mqtt_session.broker

    @property
    def published(self) -> int:
        return self.mqtt_session.published

    @property
    def acknowledged(self) -> int:
        return self.mqtt_session.acknowledged

    @property
    def puback_timeouts(self) -> int:
        """Sessions ended because PUBACKs were withheld."""
        return self.mqtt_session.puback_timeouts

    @property
    def puback_timeout_publishes(self) -> int:
        """The publishes left waiting in those sessions."""
        return self.mqtt_session.puback_timeout_publishes

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
        session = self.mqtt_session
        session.poll(timeout)
        if session.connected:
            session.check_pubacks()
        if session.connected:
            session.drain()
        session.flush_acks()
        self._housekeeping()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now - self._last_housekeeping >= 1.0:
                self._last_housekeeping = now
                self._resolve_clock()
                self._update_led()
                self._persist_not_stored()
                self.mqtt_session.save_puback_timeouts()
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
            self.mqtt_session.rescan()
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
            if self.connected and not self.mqtt_session.in_flight and self.outbox.depth() < 10:
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
        if self.mqtt_session.client is None:
            return
        self._last_heartbeat = time.monotonic()
        self.mqtt_session.publish_status(self._status("online"))
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
                self.mqtt_session.save_puback_timeouts()
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
                if self.mqtt_session.drained():
                    break
                self.step(0.02)
            if self._corrupt is None:
                self.mqtt_session.flush_acks()
        except OutboxCorrupt as exc:
            self._outbox_corrupt(exc)
        self._save_counts()
        self.mqtt_session.announce_offline()
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
