"""The SoC's own temperature, through gpiozero's ``CPUTemperature`` (the ``pi`` extra).

Useful as a first sensor on a bare Pi, and as a hint that readings from a sensor mounted near
the board are warmed by it. gpiozero is imported on the first read, so this module imports on
any machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Final, Protocol

from edge_agent.errors import SensorError
from edge_agent.sensors.base import ClosingContext, Sample, Sensor, check_sensor_id
from edge_agent.sensors.fields import Field, Settings
from tempmon_contract.kinds import KINDS, Kind

__all__ = ["DEFAULT_SENSOR_FILE", "CPUTemp"]

DEFAULT_SENSOR_FILE: Final = "/sys/class/thermal/thermal_zone0/temp"
"""The SoC's thermal zone on Raspberry Pi OS: one integer in millidegrees."""

# The BCM SoC's sensor is specified -40..+85 °C and reads up to its 125 °C limit before
# shutdown (the same range pipeline.decode accepts for kind "cpu").
_RANGE_C: Final = KINDS["cpu"].temperature


class _CPUTemperatureDevice(Protocol):
    """The part of ``gpiozero.CPUTemperature`` this driver uses."""

    @property
    def temperature(self) -> float: ...

    def close(self) -> None: ...


class CPUTemp(ClosingContext):
    """The CPU temperature of the Pi the agent runs on."""

    KIND: ClassVar[Kind] = KINDS["cpu"]
    FIELDS: ClassVar[tuple[Field, ...]] = ()
    MIN_INTERVAL_S: ClassVar[float] = 0.01

    @classmethod
    def settle(cls, where: str, sensor_id: str, settings: dict[str, object]) -> None:
        """Nothing to check across fields."""

    @classmethod
    def from_settings(cls, sensor_id: str, settings: Settings, *, w1_root: Path) -> Sensor:  # noqa: ARG003 - the registry calls every driver alike
        return cls(sensor_id)

    def __init__(
        self,
        sensor_id: str = "cpu",
        *,
        sensor_file: str = DEFAULT_SENSOR_FILE,
        pin_factory: object | None = None,
    ) -> None:
        """Set up the sensor; gpiozero's device is created by the first :meth:`read`.

        ``pin_factory`` is passed to gpiozero (tests give it a ``MockFactory``); with None,
        gpiozero picks its default factory.

        Raises:
            ConfigError: a bad sensor id.
        """
        self._id = check_sensor_id(sensor_id)
        self._sensor_file = sensor_file
        self._pin_factory = pin_factory
        self._device: _CPUTemperatureDevice | None = None
        self._closed = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self.KIND.name

    def read(self) -> Sample:
        """Read the thermal zone.

        Raises:
            SensorError: gpiozero is not installed or has no usable pin factory, the file is
                missing, unreadable or not a number, the value is outside -40..125 °C, or the
                sensor was closed.
        """
        if self._closed:
            raise SensorError(f"sensor {self._id} is closed")
        device = self._device or self._open()
        try:
            celsius = float(device.temperature)
        except (OSError, ValueError) as exc:
            raise self._unreadable(exc) from exc
        low, high = _RANGE_C
        if not (math.isfinite(celsius) and low <= celsius <= high):
            raise SensorError(
                f"sensor {self._id} read {celsius} °C from {self._sensor_file}, outside "
                f"{low:g}..{high:g} °C: is sensor_file a thermal zone's `temp` (millidegrees)?"
            )
        return Sample(celsius)

    def close(self) -> None:
        """Close gpiozero's device; later reads fail."""
        self._closed = True
        device, self._device = self._device, None
        if device is not None:
            device.close()

    def _open(self) -> _CPUTemperatureDevice:
        try:
            # Imported here: gpiozero is an optional extra.
            from gpiozero import CPUTemperature, GPIOZeroError  # noqa: PLC0415
        except ImportError as exc:
            raise SensorError(
                f"sensor {self._id} needs gpiozero ({exc}): install the `pi` extra "
                "(pip install 'edge-agent[pi]')"
            ) from exc
        try:
            # The constructor already reads the file once (gpiozero's initial event state).
            device: _CPUTemperatureDevice = CPUTemperature(
                sensor_file=self._sensor_file, pin_factory=self._pin_factory
            )
        except (OSError, ValueError) as exc:
            raise self._unreadable(exc) from exc
        except GPIOZeroError as exc:
            raise SensorError(
                f"sensor {self._id}: gpiozero has no usable pin factory ({exc}): on a Pi, make "
                "lgpio importable in the agent's venv, or set GPIOZERO_PIN_FACTORY"
            ) from exc
        self._device = device
        return device

    def _unreadable(self, exc: OSError | ValueError) -> SensorError:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return SensorError(
            f"sensor {self._id} cannot read {self._sensor_file} ({reason}): check that the "
            "thermal zone exists (`ls /sys/class/thermal`) and holds millidegrees"
        )
