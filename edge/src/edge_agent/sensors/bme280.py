"""Bosch BME280 (temperature, humidity, air pressure) over I2C, through Adafruit's
``adafruit-circuitpython-bme280`` (the ``pi`` extra).

The library runs on Blinka: ``board.I2C()`` is the Pi's bus 1 (GPIO2 SDA, GPIO3 SCL); with
``bus`` set, ``adafruit_extended_bus.ExtendedI2C(bus)`` opens ``/dev/i2c-<bus>``. Each read
puts the chip in forced mode (one conversion, then sleep), so it does not warm itself. The
libraries are imported on the first read, so this module imports on any machine; tests give
the driver a fake bus (:class:`edge_agent.sensors.fakes.FakeBME280Bus`) and the real library
computes the values.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Final, Protocol

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors.base import ClosingContext, Sample, Sensor, check_sensor_id
from edge_agent.sensors.fields import Field, Settings
from tempmon_contract.kinds import HUMIDITY, KINDS, PRESSURE, Kind

__all__ = ["ADDRESSES", "BME280", "BME280Device", "parse_address"]

ADDRESSES: Final = (0x76, 0x77)
"""The BME280's two I2C addresses: SDO to GND gives 0x76, SDO to VDDIO 0x77 (the library's
default, and the Adafruit breakout's)."""
_KIND: Final = KINDS["bme280"]
_WIRING_HINT: Final = (
    "check SDA to GPIO2 (pin 3), SCL to GPIO3 (pin 5), 3.3 V and GND, that I2C is enabled "
    "(dtparam=i2c_arm=on) and that `i2cdetect -y 1` shows the address"
)


class BME280Device(Protocol):
    """The part of ``adafruit_bme280.basic.Adafruit_BME280_I2C`` this driver uses.

    Each property runs a forced-mode conversion; the bus raises ``OSError`` when the chip does
    not answer.
    """

    @property
    def temperature(self) -> float: ...

    @property
    def relative_humidity(self) -> float: ...

    @property
    def pressure(self) -> float: ...


def parse_address(key: str, value: object) -> int:
    """An I2C address from the configuration: ``0x76`` / ``0x77`` as an integer or a string
    (``"0x76"``, ``"118"``).

    Raises:
        ConfigError: anything else, naming ``key`` and the value.
    """
    address: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        address = value
    elif isinstance(value, str):
        try:
            address = int(value.strip(), 0)
        except ValueError:
            address = None
    if address not in ADDRESSES:
        raise ConfigError(
            f"{key} = {value!r} is not a BME280 address: use 0x76 (SDO to GND) or 0x77 "
            "(SDO to 3.3 V, the default)"
        )
    return address


def _i2c_bus(bus: int | None) -> object:
    """Blinka's I2C bus: ``board.I2C()`` (bus 1 on a Pi), or ``/dev/i2c-<bus>``.

    Raises:
        SensorError: Blinka (or, for ``bus``, adafruit-extended-bus) is not installed, the
            board is not supported, or the bus does not exist.
    """
    i2c: object
    try:
        # Imported here: `import board` probes the hardware, and the libraries are an extra.
        if bus is None:
            import board  # noqa: PLC0415

            i2c = board.I2C()
        else:
            # By name: the library ships no type information (nor does adafruit_bme280).
            i2c = importlib.import_module("adafruit_extended_bus").ExtendedI2C(bus)
    except ImportError as exc:
        raise SensorError(
            f"BME280 needs adafruit-circuitpython-bme280 ({exc}): install the `pi` extra "
            "(pip install 'edge-agent[pi]')"
        ) from exc
    except (NotImplementedError, AttributeError) as exc:  # Blinka on a board it does not know
        raise SensorError(f"BME280: this board has no I2C bus Blinka knows ({exc})") from exc
    except (ValueError, OSError, RuntimeError) as exc:
        where = "the board's I2C bus" if bus is None else f"/dev/i2c-{bus}"
        raise SensorError(f"BME280: cannot open {where} ({exc}): {_WIRING_HINT}") from exc
    return i2c


def _adafruit_device(bus: object, address: int) -> BME280Device:
    """The library's device at ``address`` on ``bus``: it checks the chip id, resets the chip
    and reads its calibration.

    Raises:
        ImportError: the library is not installed.
        ValueError: nothing answers at the address (the library's probe).
        RuntimeError: the chip id is not a BME280's.
        OSError: the bus failed.
    """
    basic = importlib.import_module("adafruit_bme280.basic")
    device: BME280Device = basic.Adafruit_BME280_I2C(bus, address=address)
    return device


class BME280(ClosingContext):
    """One BME280 on an I2C bus: temperature, relative humidity and air pressure.

    A failed read (the bus raising ``OSError``: a chip that did not acknowledge, a loose wire)
    is retried ``retries`` times on the same device. The library's device is made on the first
    read: it checks the chip id, resets the chip and reads its calibration; every read puts the
    chip in forced mode again, so a chip that lost power for a moment reads on.
    """

    KIND: ClassVar[Kind] = _KIND
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field(
            "address",
            int,
            0x77,
            "its I2C address: 0x76 (SDO to GND) or 0x77 (SDO to 3.3 V)",
            parse=parse_address,
        ),
        Field(
            "bus", int, help="the I2C bus number (/dev/i2c-N); default the board's", low=0, high=255
        ),
    )
    MIN_INTERVAL_S: ClassVar[float] = 0.1
    """One forced conversion with the library's oversampling takes about 40 ms (datasheet 9.1)."""

    def __init__(
        self,
        sensor_id: str,
        *,
        address: int = 0x77,
        bus: int | None = None,
        i2c: Callable[[int | None], object] | None = None,
        device_factory: Callable[[object, int], BME280Device] | None = None,
        retries: int = 2,
    ) -> None:
        """Set up the sensor; the bus is opened by the first :meth:`read`.

        ``i2c`` makes the bus from ``bus`` (default Blinka's; tests pass a fake bus), and
        ``device_factory`` the library's device on it.

        Raises:
            ConfigError: a bad sensor id, an address other than 0x76 or 0x77, a bus number
                that is not an integer >= 0, or a negative retry count.
        """
        check_sensor_id(sensor_id)
        parse_address(f"sensor {sensor_id}: address", address)
        if bus is not None and (isinstance(bus, bool) or not isinstance(bus, int) or bus < 0):
            raise ConfigError(f"sensor {sensor_id}: bus must be an integer >= 0, not {bus!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(
                f"sensor {sensor_id}: retries must be an integer >= 0, not {retries!r}"
            )
        self._id = sensor_id
        self._address = address
        self._bus_number = bus
        self._i2c = i2c or _i2c_bus
        self._factory = device_factory or _adafruit_device
        self._retries = retries
        self._bus: object | None = None
        self._device: BME280Device | None = None
        self._closed = False

    @classmethod
    def settle(cls, where: str, sensor_id: str, settings: dict[str, object]) -> None:
        """Nothing to check across fields."""

    @classmethod
    def from_settings(cls, sensor_id: str, settings: Settings, *, w1_root: Path) -> Sensor:  # noqa: ARG003 - the registry calls every driver alike
        address = settings.integer("address")
        return cls(
            sensor_id, address=0x77 if address is None else address, bus=settings.integer("bus")
        )

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self.KIND.name

    @property
    def address(self) -> int:
        return self._address

    def _where(self) -> str:
        bus = "" if self._bus_number is None else f" on /dev/i2c-{self._bus_number}"
        return f"BME280 at {self._address:#04x}{bus}"

    def read(self) -> Sample:
        """Read temperature, humidity and pressure (one forced conversion each).

        Raises:
            SensorError: the library is missing, nothing answers at the address, the chip is
                not a BME280 (a BMP280 has no humidity: chip id 0x58), every attempt failed on
                the bus, a value is not finite or outside the BME280's range, or the sensor
                was closed. The message names the sensor and says what to check.
        """
        if self._closed:
            raise SensorError(f"sensor {self._id} is closed")
        attempts = self._retries + 1
        problem = ""
        for _ in range(attempts):
            device = self._device or self._open()
            try:
                temperature = float(device.temperature)
                humidity = float(device.relative_humidity)
                pressure = float(device.pressure)
            except (OSError, RuntimeError, ArithmeticError) as exc:
                problem = str(exc) or type(exc).__name__
                continue
            return Sample(
                self._checked("temperature_c", temperature, "°C"),
                self._checked(HUMIDITY.field, humidity, "%RH"),
                self._checked(PRESSURE.field, pressure, "hPa"),
            )
        raise SensorError(
            f"sensor {self._id} ({self._where()}) failed {attempts} reads, the last with "
            f"{problem!r}: {_WIRING_HINT}"
        )

    def close(self) -> None:
        """Release the bus (``deinit()``, where it has one); later reads fail."""
        if self._closed:
            return
        self._closed = True
        self._device = None
        bus, self._bus = self._bus, None
        deinit = getattr(bus, "deinit", None)
        if callable(deinit):
            deinit()

    def _open(self) -> BME280Device:
        if self._bus is None:
            self._bus = self._i2c(self._bus_number)
        try:
            device = self._factory(self._bus, self._address)
        except ImportError as exc:
            raise SensorError(
                f"sensor {self._id} needs adafruit-circuitpython-bme280 ({exc}): install the "
                "`pi` extra (pip install 'edge-agent[pi]')"
            ) from exc
        except ValueError as exc:  # the library's probe: "No I2C device at address: 0x77"
            other = ADDRESSES[1 - ADDRESSES.index(self._address)]
            raise SensorError(
                f"sensor {self._id}: nothing answers at {self._address:#04x} ({exc}): "
                f"{_WIRING_HINT}; the other address a BME280 can have is {other:#04x} (SDO to "
                f"{'3.3 V' if other == 0x77 else 'GND'})"
            ) from exc
        except RuntimeError as exc:  # "Failed to find BME280! Chip ID 0x58"
            raise SensorError(
                f"sensor {self._id}: the chip at {self._address:#04x} is not a BME280 ({exc}): "
                "a BMP280 (chip id 0x58) has no humidity sensor; configure a bme280 only for "
                "a chip with id 0x60"
            ) from exc
        except OSError as exc:
            raise SensorError(
                f"sensor {self._id} ({self._where()}): the bus failed while setting the chip up "
                f"({exc.strerror or exc}): {_WIRING_HINT}"
            ) from exc
        self._device = device
        return device

    def _checked(self, field: str, value: float, unit: str) -> float:
        low, high = _KIND.range_of(field)
        if not (math.isfinite(value) and low <= value <= high):
            raise SensorError(
                f"sensor {self._id} ({self._where()}) returned {field} {value} {unit}, outside "
                f"the BME280's {low:g}..{high:g} {unit}: a failing sensor, or damaged "
                "calibration data"
            )
        return value
