"""Simulated sensors: plausible, reproducible readings for a node without hardware.

A reading is a daily cycle over the UTC time of day (coolest about 05:00, warmest about 15:00),
plus Gaussian noise, plus a slow drift of its own per sensor; optionally dropouts (a failed read)
and spikes (one wild reading), to exercise the error counters and the median filter downstream.
The same seed and the same sequence of clock values give the same readings: every sensor has
its own ``random.Random``, and each read draws the same count of numbers whatever happens.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Final

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors.base import ClosingContext, Sample, Sensor, check_sensor_id
from edge_agent.sensors.fields import Field, Settings
from tempmon_contract.kinds import KINDS, Kind

__all__ = ["Simulated", "daily_cycle", "default_sensors"]

_DAY_S: Final = 86_400.0
_COOLEST_H: Final = 5.0
_WARMEST_H: Final = 15.0
# The drift is mean-reverting (an Ornstein-Uhlenbeck process) with this time constant, so a
# simulator left running for a year stays near its base instead of wandering off like a pure
# random walk: over days it moves about drift_c_per_day per sqrt(day), and it stays within a
# few degrees in the long run.
_DRIFT_TIME_CONSTANT_DAYS: Final = 30.0
_SPIKE_C: Final = (8.0, 20.0)
_HUMIDITY_BASE_PCT: Final = 50.0
_HUMIDITY_PCT_PER_C: Final = 3.0  # at constant absolute humidity, warmer air is relatively drier
_HUMIDITY_NOISE_PCT: Final = 1.0


def daily_cycle(unix_time: float) -> float:
    """Return the shape of the day at ``unix_time``: -1 at 05:00 UTC, +1 at 15:00 UTC.

    A cosine warped so that it rises for 10 hours and falls for 14, as air temperature does.
    """
    hour = (unix_time % _DAY_S) / 3600.0
    rising_h = _WARMEST_H - _COOLEST_H
    since_coolest = (hour - _COOLEST_H) % 24.0
    if since_coolest < rising_h:
        return -math.cos(math.pi * since_coolest / rising_h)
    return math.cos(math.pi * (since_coolest - rising_h) / (24.0 - rising_h))


class Simulated(ClosingContext):
    """A sensor that makes its readings up, reproducibly."""

    KIND: ClassVar[Kind] = KINDS["simulated"]
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("seed", int, help="its random seed (default: from its id)", low=0, high=2**31),
        Field("humidity", bool, False, "whether its readings carry humidity_pct"),
        Field("dropout_rate", float, 0.0, "share of reads that fail", low=0.0, high=1.0),
        Field("spike_rate", float, 0.0, "share of reads with a spike", low=0.0, high=1.0),
    )
    MIN_INTERVAL_S: ClassVar[float] = 0.01

    @classmethod
    def settle(cls, where: str, sensor_id: str, settings: dict[str, object]) -> None:
        """Nothing to check across fields."""

    @classmethod
    def from_settings(cls, sensor_id: str, settings: Settings, *, w1_root: Path) -> Sensor:  # noqa: ARG003 - the registry calls every driver alike
        seed = settings.integer("seed")
        return cls(
            sensor_id,
            seed=seed if seed is not None else sum(map(ord, sensor_id)),
            humidity=settings.flag("humidity"),
            dropout_rate=settings.number("dropout_rate"),
            spike_rate=settings.number("spike_rate"),
        )

    def __init__(
        self,
        sensor_id: str,
        *,
        seed: int,
        base_c: float = 21.0,
        amplitude_c: float = 4.0,
        noise_c: float = 0.15,
        drift_c_per_day: float = 0.5,
        humidity: bool = False,
        dropout_rate: float = 0.0,
        spike_rate: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Set up the sensor: ``base_c`` ± ``amplitude_c`` over the day.

        Raises:
            ConfigError: a bad sensor id, a setting that is not a finite number, a negative
                amplitude, noise or drift, or a rate outside 0..1.
        """
        check_sensor_id(sensor_id)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"sensor {sensor_id}: seed must be an integer, not {seed!r}")
        settings = {
            "base_c": base_c,
            "amplitude_c": amplitude_c,
            "noise_c": noise_c,
            "drift_c_per_day": drift_c_per_day,
            "dropout_rate": dropout_rate,
            "spike_rate": spike_rate,
        }
        for name, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"sensor {sensor_id}: {name} must be a number, not {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"sensor {sensor_id}: {name} must be finite, not {value!r}")
            if name != "base_c" and value < 0:
                raise ConfigError(f"sensor {sensor_id}: {name} must be >= 0, not {value!r}")
            if name.endswith("_rate") and value > 1:
                raise ConfigError(f"sensor {sensor_id}: {name} must be 0..1, not {value!r}")
        self._id = sensor_id
        self._base_c = float(base_c)
        self._amplitude_c = float(amplitude_c)
        self._noise_c = float(noise_c)
        self._drift_c_per_day = float(drift_c_per_day)
        self._humidity = humidity
        self._dropout_rate = float(dropout_rate)
        self._spike_rate = float(spike_rate)
        self._clock = clock
        self._random = random.Random(seed)  # noqa: S311 - a simulation, not cryptography
        self._drift_c = 0.0
        self._last_time: float | None = None
        self._closed = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self.KIND.name

    @property
    def has_humidity(self) -> bool:
        """Whether readings carry ``humidity_pct``."""
        return self._humidity

    def read(self) -> Sample:
        """Make up the reading for the clock's current time.

        Raises:
            SensorError: a simulated dropout (drawn with ``dropout_rate``), or the sensor was
                closed.
        """
        if self._closed:
            raise SensorError(f"sensor {self._id} is closed")
        now = self._clock()
        rng = self._random
        # Always the same draws, in the same order, whatever the outcome.
        drift_step = rng.gauss(0.0, 1.0)
        noise = rng.gauss(0.0, 1.0)
        humidity_noise = rng.gauss(0.0, 1.0)
        dropout = rng.random() < self._dropout_rate
        spike = rng.random() < self._spike_rate
        spike_c = rng.uniform(*_SPIKE_C) * rng.choice((-1.0, 1.0))

        self._advance_drift(now, drift_step)
        if dropout:
            raise SensorError(
                f"sensor {self._id}: simulated dropout (dropout_rate={self._dropout_rate:g})"
            )
        clean_c = self._base_c + self._amplitude_c * daily_cycle(now) + self._drift_c
        temperature_c = clean_c + self._noise_c * noise + (spike_c if spike else 0.0)
        if not self._humidity:
            return Sample(temperature_c)
        humidity_pct = (
            _HUMIDITY_BASE_PCT
            - _HUMIDITY_PCT_PER_C * (clean_c - self._base_c)
            + _HUMIDITY_NOISE_PCT * humidity_noise
        )
        return Sample(temperature_c, min(100.0, max(0.0, humidity_pct)))

    def close(self) -> None:
        """Nothing to release; later reads fail, as a real sensor's would."""
        self._closed = True

    def _advance_drift(self, now: float, step: float) -> None:
        elapsed_days = 0.0 if self._last_time is None else max(0.0, now - self._last_time) / _DAY_S
        self._last_time = now
        if elapsed_days == 0.0:
            return
        # Exact Ornstein-Uhlenbeck update over elapsed_days; its variance is about
        # drift_c_per_day**2 * elapsed_days for short steps.
        tau = _DRIFT_TIME_CONSTANT_DAYS
        decay = math.exp(-elapsed_days / tau)
        spread = self._drift_c_per_day * math.sqrt(tau / 2.0 * (1.0 - decay * decay))
        self._drift_c = self._drift_c * decay + spread * step


def default_sensors(seed: int = 1, *, clock: Callable[[], float] = time.time) -> list[Simulated]:
    """Three simulated sensors for a demo node.

    ``sim-1`` indoors (21 ± 4 °C), ``sim-2`` outdoors (10 ± 7 °C), ``sim-3`` with humidity.
    Each gets its own seed derived from ``seed``, so their noise and drift differ.
    """
    return [
        Simulated("sim-1", seed=seed * 1000 + 1, clock=clock),
        Simulated(
            "sim-2", seed=seed * 1000 + 2, base_c=10.0, amplitude_c=7.0, noise_c=0.3, clock=clock
        ),
        Simulated(
            "sim-3", seed=seed * 1000 + 3, base_c=22.0, amplitude_c=3.0, humidity=True, clock=clock
        ),
    ]
