"""The one interface every sensor kind implements, and a calibration wrapper that works on any.

Nothing above a driver knows which kind of hardware it talks to: the sampling loop calls
``read()`` and gets a :class:`Sample` or a :class:`~edge_agent.errors.SensorError`.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self, runtime_checkable

from edge_agent.errors import ConfigError

__all__ = [
    "SENSOR_ID_PATTERN",
    "Calibrated",
    "ClosingContext",
    "Sample",
    "Sensor",
    "check_sensor_id",
]

SENSOR_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A sensor id is one MQTT topic level and one routing-key word: a dot or slash would split it."""

_MEDIAN_WINDOWS: Final = range(3, 16, 2)


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: temperature in °C, and relative humidity in % where the sensor measures it."""

    temperature_c: float
    humidity_pct: float | None = None


@runtime_checkable
class Sensor(Protocol):
    """What the agent needs from a sensor, whatever the hardware behind it."""

    @property
    def id(self) -> str:
        """The id used in the MQTT topic ``sensors/<node>/<id>``: ``[A-Za-z0-9_-]{1,64}``."""
        ...

    @property
    def kind(self) -> str:
        """One of ``ds18b20``, ``dht22``, ``cpu``, ``simulated`` (the wire format's kinds)."""
        ...

    def read(self) -> Sample:
        """Take one reading.

        Raises:
            SensorError: the sensor could not be read (after the driver's own retries), or was
                closed; the message names the sensor and says what to check.
        """
        ...

    def close(self) -> None:
        """Release the hardware (a GPIO pin, a file); safe to call more than once."""
        ...


class ClosingContext:
    """Mixin: ``with sensor:`` closes it on the way out, error or not."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def check_sensor_id(sensor_id: str) -> str:
    """Return ``sensor_id`` unchanged if it can be a topic level.

    Raises:
        ConfigError: the id is empty, longer than 64 characters, or has a character outside
            ``[A-Za-z0-9_-]`` (a ``.`` or ``/`` would change the broker's routing key).
    """
    if not isinstance(sensor_id, str) or not SENSOR_ID_PATTERN.fullmatch(sensor_id):
        raise ConfigError(
            f"sensor id {sensor_id!r} is not usable in an MQTT topic: use 1 to 64 characters "
            "from A-Z, a-z, 0-9, '_' and '-'"
        )
    return sensor_id


class Calibrated(ClosingContext):
    """A sensor with a calibration offset and, optionally, a running-median spike filter.

    The median is over the last ``median_window`` raw readings (temperature and humidity
    separately); until that many exist, over those there are. A median of 3 removes a single
    spike, which is the usual failure of a long 1-Wire cable or a DHT22 on a marginal pull-up,
    at the cost of ``median_window // 2`` readings of lag on a real step. Failed reads never
    enter the window. The offset is added to the temperature only.
    """

    def __init__(self, sensor: Sensor, *, offset_c: float = 0.0, median_window: int = 1) -> None:
        """Wrap ``sensor``.

        Raises:
            ConfigError: ``offset_c`` is not a finite number, or ``median_window`` is neither 1
                nor an odd number from 3 to 15.
        """
        if isinstance(offset_c, bool) or not isinstance(offset_c, int | float):
            raise ConfigError(f"sensor {sensor.id}: offset_c must be a number, not {offset_c!r}")
        if not math.isfinite(offset_c):
            raise ConfigError(f"sensor {sensor.id}: offset_c must be finite, not {offset_c!r}")
        if isinstance(median_window, bool) or not isinstance(median_window, int):
            raise ConfigError(
                f"sensor {sensor.id}: median_window must be an integer, not {median_window!r}"
            )
        if median_window != 1 and median_window not in _MEDIAN_WINDOWS:
            raise ConfigError(
                f"sensor {sensor.id}: median_window is {median_window}: use 1 (no filter) or an "
                "odd number from 3 to 15"
            )
        self._sensor = sensor
        self._offset_c = float(offset_c)
        self._temperatures: deque[float] = deque(maxlen=median_window)
        self._humidities: deque[float] = deque(maxlen=median_window)

    @property
    def id(self) -> str:
        return self._sensor.id

    @property
    def kind(self) -> str:
        return self._sensor.kind

    @property
    def sensor(self) -> Sensor:
        """The wrapped sensor."""
        return self._sensor

    def read(self) -> Sample:
        """Read the wrapped sensor, filter, and add the offset.

        Raises:
            SensorError: from the wrapped sensor; the window is left as it was.
        """
        raw = self._sensor.read()
        self._temperatures.append(raw.temperature_c)
        humidity: float | None = None
        if raw.humidity_pct is not None:
            self._humidities.append(raw.humidity_pct)
            humidity = statistics.median(self._humidities)
        return Sample(statistics.median(self._temperatures) + self._offset_c, humidity)

    def close(self) -> None:
        self._temperatures.clear()
        self._humidities.clear()
        self._sensor.close()
