"""DHT22 (AM2302) through Adafruit's ``adafruit-circuitpython-dht`` (the ``pi`` extra).

The DHT22's single-wire protocol is timed in microseconds, so reads fail often under a busy
Linux kernel; the library reports each failure as a ``RuntimeError`` and the cure is to try
again, no sooner than 2 s after the last read (the sensor's minimum sampling period, AM2302
datasheet). The library and Blinka's ``board`` are imported only when the first device is
created, so this module imports on any machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Final, Protocol

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors.base import ClosingContext, Sample, Sensor, check_sensor_id
from edge_agent.sensors.fields import Field, Settings
from tempmon_contract.kinds import HUMIDITY, KINDS, Kind

__all__ = ["DHT22", "DHTDevice"]

_TEMPERATURE_RANGE_C: Final = KINDS["dht22"].temperature  # datasheet: -40..80 °C
_HUMIDITY_RANGE_PCT: Final = KINDS["dht22"].range_of(HUMIDITY.field)
_GPIO_PINS: Final = range(28)  # BCM numbers on the 40-pin header
_WIRING_HINT: Final = (
    "check that the pin is the BCM GPIO number (not the physical pin number), the 10 kΩ "
    "pull-up from DATA to 3.3 V, and that the sensor is powered from 3.3 V"
)


class DHTDevice(Protocol):
    """The part of ``adafruit_dht.DHT22`` this driver uses.

    Reading either property triggers a measurement (the library caches it for 2 s); a failed
    one raises ``RuntimeError``.
    """

    @property
    def temperature(self) -> float | None: ...

    @property
    def humidity(self) -> float | None: ...

    def exit(self) -> None:
        """Release the GPIO pin."""
        ...


def _adafruit_device(pin: int) -> DHTDevice:
    """Create the library's device on BCM ``pin``, bit-banged (``use_pulseio=False``).

    ``use_pulseio=False`` avoids the library's ``libgpiod_pulsein`` helper process, which can
    outlive a killed agent and keep the pin busy.

    Raises:
        SensorError: the library or Blinka is not installed, this is not a supported board,
            the board has no such pin, or the pin cannot be claimed.
    """
    try:
        # Imported here, not at module level: `import board` probes the hardware, and the
        # library is an optional extra.
        import adafruit_dht  # noqa: PLC0415
        import board  # noqa: PLC0415
    except ImportError as exc:
        raise SensorError(
            f"DHT22 on GPIO{pin} needs adafruit-circuitpython-dht ({exc}): install the `pi` "
            "extra (pip install 'edge-agent[pi]') and libgpiod (sudo apt install libgpiod2)"
        ) from exc
    except NotImplementedError as exc:  # Blinka's answer on a board it does not know
        raise SensorError(f"DHT22 on GPIO{pin}: this board is not supported ({exc})") from exc
    board_pin = getattr(board, f"D{pin}", None)
    if board_pin is None:
        raise SensorError(f"DHT22: this board has no pin D{pin}: {_WIRING_HINT}")
    try:
        device: DHTDevice = adafruit_dht.DHT22(board_pin, use_pulseio=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise SensorError(
            f"DHT22 on GPIO{pin}: cannot claim the pin ({exc}): is another process (or a "
            "leftover libgpiod_pulsein) using it?"
        ) from exc
    return device


class DHT22(ClosingContext):
    """One DHT22 on a GPIO pin.

    Reads are spaced at least ``min_interval_s`` apart, across calls and retries alike; a failed
    read (one of the library's ``RuntimeError`` messages, or no value) is retried ``retries``
    times, at least ``retry_delay_s`` after the previous attempt.
    """

    KIND: ClassVar[Kind] = KINDS["dht22"]
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("pin", int, help="its BCM GPIO number", low=0, high=27, required=True),
    )
    MIN_INTERVAL_S: ClassVar[float] = 2.0
    """The sensor's minimum sampling period (AM2302 datasheet)."""

    @classmethod
    def settle(cls, where: str, sensor_id: str, settings: dict[str, object]) -> None:
        """Nothing to check across fields."""

    @classmethod
    def from_settings(cls, sensor_id: str, settings: Settings, *, w1_root: Path) -> Sensor:  # noqa: ARG003 - the registry calls every driver alike
        pin = settings.integer("pin")
        if pin is None:
            raise ConfigError(f"sensor {sensor_id}: a dht22 needs a pin")
        return cls(sensor_id, pin)

    def __init__(
        self,
        sensor_id: str,
        pin: int,
        *,
        device_factory: Callable[[int], DHTDevice] | None = None,
        min_interval_s: float = 2.0,
        retries: int = 5,
        retry_delay_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Set up the sensor; the device (and the pin) is claimed by the first :meth:`read`.

        Raises:
            ConfigError: a bad sensor id, a pin outside BCM 0..27, or a negative interval,
                retry count or delay.
        """
        check_sensor_id(sensor_id)
        if isinstance(pin, bool) or not isinstance(pin, int) or pin not in _GPIO_PINS:
            raise ConfigError(
                f"sensor {sensor_id}: pin {pin!r} is not a BCM GPIO number (0..27); e.g. "
                "physical pin 7 is GPIO4"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(
                f"sensor {sensor_id}: retries must be an integer >= 0, not {retries!r}"
            )
        for name, value in (("min_interval_s", min_interval_s), ("retry_delay_s", retry_delay_s)):
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ConfigError(f"sensor {sensor_id}: {name} must be >= 0, not {value!r}")
        self._id = sensor_id
        self._pin = pin
        self._factory = device_factory or _adafruit_device
        self._min_interval_s = float(min_interval_s)
        self._retries = retries
        self._retry_delay_s = float(retry_delay_s)
        self._clock = clock
        self._sleep = sleep
        self._device: DHTDevice | None = None
        self._last_read: float | None = None
        self._closed = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self.KIND.name

    @property
    def pin(self) -> int:
        """The BCM GPIO number."""
        return self._pin

    def read(self) -> Sample:
        """Read temperature and humidity, waiting out the minimum interval first.

        Raises:
            SensorError: the device cannot be created (library missing, pin busy), every
                attempt failed (the message has the library's last error), a value is outside
                the DHT22's range (-40..80 °C, 0..100 %RH), or the sensor was closed.
        """
        if self._closed:
            raise SensorError(f"sensor {self._id} is closed")
        if self._device is None:
            self._device = self._factory(self._pin)
        device = self._device
        attempts = self._retries + 1
        problem = ""
        for attempt in range(1, attempts + 1):
            gap = (
                self._min_interval_s
                if attempt == 1
                else max(self._min_interval_s, self._retry_delay_s)
            )
            self._wait(gap)
            try:
                temperature = device.temperature
                humidity = device.humidity
            except (RuntimeError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
                continue
            finally:
                # From the end of the read: the sensor needs the full period after answering.
                self._last_read = self._clock()
            if temperature is None or humidity is None:
                problem = "the library returned no value"
                continue
            return Sample(self._checked_temperature(temperature), self._checked_humidity(humidity))
        raise SensorError(
            f"sensor {self._id} (DHT22 on GPIO{self._pin}) failed {attempts} reads, the last "
            f"with {problem!r}: {_WIRING_HINT}"
        )

    def close(self) -> None:
        """Release the pin (``exit()`` on the library's device); later reads fail."""
        if self._closed:
            return
        self._closed = True
        device, self._device = self._device, None
        if device is not None:
            device.exit()

    def _wait(self, gap: float) -> None:
        if self._last_read is None:
            return
        remaining = self._last_read + gap - self._clock()
        if remaining > 0:
            self._sleep(remaining)

    def _checked_temperature(self, value: float) -> float:
        low, high = _TEMPERATURE_RANGE_C
        if not low <= value <= high:
            raise SensorError(
                f"sensor {self._id} (DHT22 on GPIO{self._pin}) returned {value} °C, outside "
                f"{low:g}..{high:g} °C: a failing sensor, or a DHT11 wired where a DHT22 is "
                "configured"
            )
        return float(value)

    def _checked_humidity(self, value: float) -> float:
        low, high = _HUMIDITY_RANGE_PCT
        if not low <= value <= high:
            raise SensorError(
                f"sensor {self._id} (DHT22 on GPIO{self._pin}) returned {value} %RH, outside "
                f"{low:g}..{high:g} %: a failing sensor, or a DHT11 wired where a DHT22 is "
                "configured"
            )
        return float(value)
