"""The agent: samplers write readings into the outbox; one MQTT session drains it.

* One sampler thread per sensor reads at its interval and writes each reading into the
  outbox before anything else happens to it. A sensor that fails keeps failing alone: its
  errors are counted and the other samplers go on.
* The main thread owns the MQTT client (paho-mqtt 2.x, its network loop driven from here, so
  callbacks run on this thread). While connected it drains the outbox oldest first, at most
  ``drain_rate_per_s`` and ``max_inflight`` unacknowledged publishes at a time, and deletes a
  row only when the broker's PUBACK for it arrives. A dropped connection is rebuilt with
  capped, jittered back-off; whatever was not acknowledged is sent again (the pipeline
  ignores duplicates by the natural key).
* On SIGTERM the samplers stop, the session flushes what it can for a few seconds, publishes
  its retained ``offline`` status and disconnects; nothing unacknowledged is lost, it stays
  in the outbox for the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
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
from edge_agent.config import AgentConfig, SensorConfig
from edge_agent.errors import ConfigError, EdgeError, SensorError
from edge_agent.led import StatusLed
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.sensors import Calibrated, Sample, Sensor
from edge_agent.wire import reading_payload, reading_topic, status_payload, status_topic

__all__ = ["Agent", "Backoff", "build_sensor", "build_sensors"]

log = logging.getLogger(__name__)


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

    def reset(self) -> None:
        self._next = self.initial


@dataclass
class _Counters:
    read_errors: dict[str, int]
    readings: int = 0
    disk_full: int = 0


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
    ) -> None:
        super().__init__(name=f"sampler-{sensor.id}", daemon=True)
        self.sensor = sensor
        self.interval_s = interval_s
        self.outbox = outbox
        self.clock = clock
        self.counters = counters
        self.lock = lock
        self.stop = stop
        self._failing = False
        self._storing_failed = False

    def run(self) -> None:
        next_due = time.monotonic()
        while not self.stop.wait(max(0.0, next_due - time.monotonic())):
            self.sample_once()
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
        except OutboxError as exc:  # a full disk, or a file that cannot be written
            with self.lock:
                self.counters.disk_full += 1
            if not self._storing_failed:  # once per episode: the count is in the heartbeat
                log.error(  # noqa: TRY400 - the message says it all
                    "readings lost: cannot store them in the outbox sensor=%s error=%s",
                    self.sensor.id,
                    exc,
                )
                self._storing_failed = True
            return
        if self._storing_failed:
            log.info("outbox stores readings again sensor=%s", self.sensor.id)
            self._storing_failed = False
        with self.lock:
            self.counters.readings += 1


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
    ) -> None:
        self.config = config
        self.node = config.node_id
        self.clock = clock or KernelClock(assume_synced=not config.clock.require_sync)
        self.outbox = outbox or Outbox(
            config.outbox.path,
            max_rows=config.outbox.max_rows,
            max_age_s=config.outbox.max_age_days * 86400,
        )
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
        self.connected = False
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._inflight_seqs: set[int] = set()
        self._acked: list[int] = []
        self._cursor = 0
        self._tokens = 0.0
        self._last_refill = time.monotonic()
        self._backoff = Backoff()
        self._next_attempt = 0.0
        self._connected_since = 0.0
        self._last_heartbeat = 0.0
        self._last_housekeeping = 0.0
        self._last_bounds = 0.0
        self.published = 0
        self.acknowledged = 0
        self._delete_failing = False
        self._disk_full_persisted = 0

    # -- MQTT client ---------------------------------------------------------------------------
    def _new_client(self) -> mqtt.Client:
        m = self.config.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.node,
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
        client.will_set(
            status_topic(self.node),
            status_payload(node=self.node, state="offline"),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            log.error(
                "broker refused the connection host=%s reason=%s: check the node's user and "
                "password on the gateway (users.sh node %s)",
                self.config.mqtt.host,
                reason,
                self.node,
            )
            client.disconnect()
            return
        self.connected = True
        self._connected_since = time.monotonic()
        self._cursor = 0  # resend everything not yet acknowledged
        self._inflight.clear()
        self._inflight_seqs.clear()
        log.info(
            "connected host=%s port=%d outbox_depth=%d",
            self.config.mqtt.host,
            self.config.mqtt.port,
            self.outbox.depth(),
        )
        self._publish_status()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self._lost(str(reason))

    def _lost(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        self._inflight.clear()
        self._inflight_seqs.clear()
        if time.monotonic() - self._connected_since > 60:
            self._backoff.reset()
        delay = self._backoff.next()
        self._next_attempt = time.monotonic() + delay
        if was:
            log.warning("disconnected reason=%s retry_in_s=%.1f", reason, delay)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: ReasonCode, _p: Any) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self._inflight_seqs.discard(seq)
            self._acked.append(seq)

    def _try_connect(self) -> None:
        if self._client is None:
            self._client = self._client_factory()
        m = self.config.mqtt
        try:
            self._client.connect(m.host, m.port, keepalive=m.keepalive_s)
        except (OSError, ssl.SSLError) as exc:
            delay = self._backoff.next()
            self._next_attempt = time.monotonic() + delay
            log.warning(
                "broker unreachable host=%s port=%d retry_in_s=%.1f error=%s",
                m.host,
                m.port,
                delay,
                exc,
            )
            return
        # The CONNACK arrives through the loop; until then do not try again.
        self._next_attempt = time.monotonic() + max(m.keepalive_s, 10)

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
            )
            sampler.start()
            self._samplers.append(sampler)

    def run(self, stop: threading.Event) -> None:
        """Sample and publish until ``stop`` is set; then shut down in order."""
        if self.config.clock.require_sync and not self.clock.synchronized():
            log.warning(
                "system clock not synchronised: readings are held until NTP syncs "
                "(timedatectl shows 'System clock synchronized: no')"
            )
        self.start_sampling()
        log.info(
            "agent started node=%s sensors=%s outbox=%s depth=%d",
            self.node,
            ",".join(s.id for s in self.sensors),
            self.outbox.path,
            self.outbox.depth(),
        )
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.shutdown()

    def step(self, timeout: float = 0.05) -> None:
        """One turn: network I/O, draining, acknowledgements, housekeeping."""
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
            self._drain()
        self._flush_acks()
        self._housekeeping()

    def _drain(self) -> None:
        assert self._client is not None  # noqa: S101 - connected implies a client
        now = time.monotonic()
        rate = self.config.outbox.drain_rate_per_s
        self._tokens = min(rate, self._tokens + (now - self._last_refill) * rate)
        self._last_refill = now
        # Keep one slot free for status messages.
        room = self.config.mqtt.max_inflight - 1 - len(self._inflight)
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
            info = self._client.publish(reading_topic(self.node, row.sensor), payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
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
                self._persist_disk_full()
            if now - self._last_bounds >= 60.0:
                self._last_bounds = now
                dropped = self.outbox.enforce_bounds(self.clock.wall())
                if dropped:
                    log.warning("outbox full: dropped the oldest readings count=%d", dropped)
        except OutboxError as exc:  # a full disk must not stop the agent; it is retried
            log.debug("outbox housekeeping failed: %s", exc)
        if self.connected and now - self._last_heartbeat >= self.config.heartbeat_s:
            self._publish_status()

    def _persist_disk_full(self) -> None:
        """Fold readings lost to a full disk into the outbox's persisted dropped total."""
        with self._lock:
            pending = self.counters.disk_full - self._disk_full_persisted
        if pending:
            self.outbox.count_dropped(pending)
            self._disk_full_persisted += pending

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
        except Exception:  # an LED must never stop the agent
            log.debug("status LED failed", exc_info=True)

    def _status(self, state: str) -> bytes:
        with self._lock:
            errors = dict(self.counters.read_errors)
        return status_payload(
            node=self.node,
            state=state,
            ts=self.clock.wall() if self.clock.synchronized() else None,
            agent_version=__version__,
            uptime_s=time.monotonic() - self._started,
            outbox_depth=self.outbox.depth(),
            dropped=self.outbox.dropped_total()
            + self.counters.disk_full
            - self._disk_full_persisted,
            read_errors=errors,
        )

    def _publish_status(self) -> None:
        if self._client is None:
            return
        self._last_heartbeat = time.monotonic()
        payload = self._status("online")
        self._client.publish(status_topic(self.node), payload, qos=1, retain=True)
        with contextlib.suppress(EdgeError):
            self.outbox.set_meta("read_errors", json.dumps(self.counters.read_errors))

    # -- shutdown ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop sampling, flush for a few seconds, announce ``offline``, close everything."""
        self._sampling_stop.set()
        for sampler in self._samplers:
            sampler.join(5)
        deadline = time.monotonic() + self.config.shutdown_flush_s
        while self.connected and time.monotonic() < deadline:
            if not self._inflight and not self.outbox.pending(self._cursor, 1):
                break
            self.step(0.02)
        self._flush_acks()
        if self._client is not None and self.connected:
            info = self._client.publish(
                status_topic(self.node),
                status_payload(node=self.node, state="offline"),
                qos=1,
                retain=True,
            )
            end = time.monotonic() + 2
            while not info.is_published() and time.monotonic() < end and self.connected:
                self._client.loop(0.02)
            self._client.disconnect()
            self._client.loop(0.1)
        log.info(
            "agent stopped published=%d acknowledged=%d left_in_outbox=%d",
            self.published,
            self.acknowledged,
            self.outbox.depth(),
        )
        for sensor in self.sensors:
            with contextlib.suppress(Exception):
                sensor.close()
        with contextlib.suppress(Exception):
            self.led.close()
        self.outbox.close()
