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

from edge_agent.errors import ConfigError, SensorError
from tempmon_contract.ids import ID, ID_RULE
from tempmon_contract.kinds import KINDS, OPTIONAL_QUANTITIES, TEMPERATURE

__all__ = [
    "SENSOR_ID_PATTERN",
    "Calibrated",
    "ClosingContext",
    "Named",
    "Sample",
    "Sensor",
    "check_sample",
    "check_sensor_id",
]

SENSOR_ID_PATTERN: Final[re.Pattern[str]] = ID
"""A sensor id is one MQTT topic level and one routing-key word: a dot or slash would split it
(the contract's :data:`tempmon_contract.ids.ID`)."""

_MEDIAN_WINDOWS: Final = range(3, 16, 2)


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: temperature in °C, relative humidity in % and air pressure in hPa where the
    sensor measures them."""

    temperature_c: float
    humidity_pct: float | None = None
    pressure_hpa: float | None = None


@runtime_checkable
class Sensor(Protocol):
    """What the agent needs from a sensor, whatever the hardware behind it."""

    @property
    def id(self) -> str:
        """The id used in the MQTT topic ``sensors/<node>/<id>``: ``[A-Za-z0-9_-]{1,64}``."""
        ...

    @property
    def kind(self) -> str:
        """One of the contract's kinds (:data:`tempmon_contract.kinds.KINDS`)."""
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
        raise ConfigError(f"sensor id {sensor_id!r} is not usable in an MQTT topic: use {ID_RULE}")
    return sensor_id


def check_sample(sensor_id: str, kind: str, sample: Sample, *, offset_c: float = 0.0) -> Sample:
    """Return ``sample`` if the pipeline will take it for ``kind``: each measured value finite,
    within the kind's range (:meth:`tempmon_contract.kinds.Kind.range_of`), and only the
    fields the kind measures.

    A value past the range is a read error here, on the node, where the sensor is named and
    the error is counted: sent, it would be dead-lettered by the pipeline.

    Raises:
        SensorError: names the sensor, the field, the value, the ``offset_c`` added to it (if
            any) and the range.
    """
    spec = KINDS.get(kind)
    if spec is None:
        raise SensorError(f"sensor {sensor_id}: kind {kind!r} is not one of {', '.join(KINDS)}")
    values = {
        TEMPERATURE.field: sample.temperature_c,
        "humidity_pct": sample.humidity_pct,
        "pressure_hpa": sample.pressure_hpa,
    }
    units = {TEMPERATURE.field: TEMPERATURE.unit} | {q.field: q.unit for q in OPTIONAL_QUANTITIES}
    for field, value in values.items():
        if value is None:
            continue
        if field != TEMPERATURE.field and field not in spec.measures:
            raise SensorError(
                f"sensor {sensor_id}: {field} {value!r} given, but a {kind} measures no "
                f"{field.split('_')[0]}: a driver bug"
            )
        unit = units[field]
        low, high = spec.range_of(field)
        if isinstance(value, int | float) and math.isfinite(value) and low <= value <= high:
            continue
        if field == TEMPERATURE.field and offset_c:
            raw = value - offset_c
            raise SensorError(
                f"sensor {sensor_id}: {field} {value:g} {unit} (read {raw:g} {unit}, offset_c "
                f"{offset_c:+g} {unit}) is outside what {spec.phrase} ({low:g}..{high:g} {unit}): "
                "check the sensor and its offset_c"
            )
        raise SensorError(
            f"sensor {sensor_id}: {field} {value!r} {unit} is outside what {spec.phrase} "
            f"({low:g}..{high:g} {unit}): check the sensor and its wiring"
        )
    return sample


class Named(ClosingContext):
    """A sensor published under a friendly id (``kitchen``) instead of its device id."""

    def __init__(self, sensor: Sensor, sensor_id: str) -> None:
        """Raises:
        ConfigError: ``sensor_id`` cannot be a topic level.
        """
        self._sensor = sensor
        self._id = check_sensor_id(sensor_id)

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self._sensor.kind

    @property
    def sensor(self) -> Sensor:
        """The wrapped sensor."""
        return self._sensor

    def read(self) -> Sample:
        return self._sensor.read()

    def close(self) -> None:
        self._sensor.close()


class Calibrated(ClosingContext):
    """A sensor with a calibration offset and, optionally, a running-median spike filter.

    The median is over the last ``median_window`` raw readings (temperature, humidity and
    pressure separately); until that many exist, over those there are. A median of 3 removes a
    single spike, which is the usual failure of a long 1-Wire cable or a DHT22 on a marginal
    pull-up, at the cost of ``median_window // 2`` readings of lag on a real step. Failed reads
    never enter the window. The offset is added to the temperature only.

    What comes out is held to the kind's ranges in the contract (:func:`check_sample`): an
    offset that pushes a reading past what the kind can measure makes it a read error, never a
    reading the pipeline would dead-letter. The registry wraps every configured sensor in one.
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
        self._pressures: deque[float] = deque(maxlen=median_window)

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
            SensorError: from the wrapped sensor (the window is left as it was), or the result
                is not a reading the contract allows for the kind (see :func:`check_sample`).
        """
        raw = self._sensor.read()
        self._temperatures.append(raw.temperature_c)
        sample = Sample(
            statistics.median(self._temperatures) + self._offset_c,
            _median(self._humidities, raw.humidity_pct),
            _median(self._pressures, raw.pressure_hpa),
        )
        return check_sample(self.id, self.kind, sample, offset_c=self._offset_c)

    def close(self) -> None:
        self._temperatures.clear()
        self._humidities.clear()
        self._pressures.clear()
        self._sensor.close()


def _median(window: deque[float], value: float | None) -> float | None:
    if value is None:
        return None
    window.append(value)
    return statistics.median(window)
