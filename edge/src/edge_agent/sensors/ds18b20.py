"""DS18B20 through the kernel's 1-Wire sysfs driver (``w1-gpio`` + ``w1_therm``).

The kernel does the bus timing; this module only reads text files, so the whole driver is
tested against a directory in ``tmp_path`` holding the kernel's exact formats. Enabling the bus
(``dtoverlay=w1-gpio`` in ``config.txt``) is provisioning's job: nothing here runs ``modprobe``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Final

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors.base import ClosingContext, Named, Sample, Sensor, check_sensor_id
from edge_agent.sensors.fields import Field, Settings
from tempmon_contract.kinds import KINDS, Kind

__all__ = [
    "DS18B20",
    "FAMILY",
    "W1_ROOT",
    "discover",
    "parse_temperature",
    "parse_w1_slave",
]

W1_ROOT: Final = Path("/sys/bus/w1/devices")
"""Where the kernel lists 1-Wire slaves, one directory per device, named ``<family>-<serial>``."""

FAMILY: Final = "28"
"""The DS18B20's 1-Wire family code.

Other w1_therm chips (10- DS18S20, 22- DS1822, 3b- DS1825, 42- DS28EA00) have other
resolutions and quirks and are ignored; so are the ``00-`` ghosts a noisy bus produces.
"""

_DEVICE_ID: Final = re.compile(r"28-[0-9a-f]{12}")
# Kernel format (w1_therm, w1_slave_show): the 9 scratchpad bytes, then the CRC verdict; then
# the same 9 bytes and the temperature in millidegrees.
_CRC_LINE: Final = re.compile(r"((?:[0-9a-fA-F]{2} ){9}): crc=([0-9a-fA-F]{2}) (YES|NO)")
_TEMPERATURE_LINE: Final = re.compile(r"((?:[0-9a-fA-F]{2} ){9})t=(-?[0-9]+)")
_ALL_ZERO: Final = "00 " * 9

# The DS18B20 loads 85.0 °C into its scratchpad at power-on; reading it back means the
# conversion never ran (the sensor browned out or was just plugged in). 127.9375 °C is 0x07FF,
# what the kernel decodes when the bus reads all ones: insufficient power or a bus fault.
_POWER_ON_MILLI: Final = 85000
_BUS_FAULT_MILLI: Final = 127937
_RANGE_C: Final = KINDS["ds18b20"].temperature  # datasheet: -55..125 °C


class _TransientError(SensorError):
    """A failure that the next conversion may not repeat: worth a retry."""


def discover(root: Path = W1_ROOT) -> list[str]:
    """Return the sorted ids of the DS18B20s the kernel sees on the 1-Wire bus.

    Only family ``28-`` is a DS18B20; other families are ignored (see :data:`FAMILY`).

    Raises:
        SensorError: ``root`` does not exist or cannot be listed: the 1-Wire bus is not enabled.
    """
    try:
        entries = list(root.iterdir())
    except OSError as exc:
        raise SensorError(
            f"cannot list the 1-Wire bus at {root} ({exc.strerror or exc}): enable it with "
            "`dtoverlay=w1-gpio` in /boot/firmware/config.txt (GPIO4 by default) and reboot"
        ) from exc
    return sorted(
        entry.name for entry in entries if _DEVICE_ID.fullmatch(entry.name) and entry.is_dir()
    )


def parse_w1_slave(text: str, device: str) -> float:
    """Return the temperature in °C from the text of a ``w1_slave`` file.

    Raises:
        SensorError: the text is not the kernel's two-line format (truncated, for instance),
            the CRC check failed, the data bytes are all zero (the sensor did not answer), or
            the value is the power-on 85.0 °C, the bus-fault 127.94 °C, or outside -55..125 °C.
    """
    lines = text.strip().splitlines()
    crc = _CRC_LINE.fullmatch(lines[0].strip()) if len(lines) == 2 else None
    data = _TEMPERATURE_LINE.fullmatch(lines[1].strip()) if crc else None
    if crc is None or data is None or crc.group(1).lower() != data.group(1).lower():
        raise _TransientError(
            f"sensor {device} gave an unreadable w1_slave ({text[:120]!r}): expected the "
            "kernel's two lines, '<9 bytes> : crc=<xx> YES' and '<9 bytes> t=<millidegrees>'; "
            "a truncated read usually means the sensor dropped off the bus: check its wiring"
        )
    if crc.group(3) == "NO":
        raise _TransientError(
            f"sensor {device} failed the CRC check (crc={crc.group(2)} NO): electrical noise, "
            "a long cable or a weak pull-up: check the 4.7 kΩ pull-up from DATA to 3.3 V, and "
            "use a shorter or twisted-pair cable"
        )
    if crc.group(1) == _ALL_ZERO:
        raise _TransientError(
            f"sensor {device} returned all-zero data (t={data.group(2)}): the sensor is not "
            "responding: check its data line and the 4.7 kΩ pull-up from DATA to 3.3 V"
        )
    return _check_millidegrees(int(data.group(2)), device)


def parse_temperature(text: str, device: str) -> float:
    """Return the temperature in °C from the text of the ``temperature`` attribute.

    Newer kernels expose this file next to ``w1_slave``: one integer in millidegrees. It has no
    CRC line: the kernel fails the read itself when the check fails.

    Raises:
        SensorError: the text is not an integer, or the value is the power-on 85.0 °C, the
            bus-fault 127.94 °C, or outside -55..125 °C.
    """
    stripped = text.strip()
    if not re.fullmatch(r"-?[0-9]+", stripped):
        raise _TransientError(
            f"sensor {device} gave an unreadable temperature attribute ({text[:40]!r}): "
            "expected an integer in millidegrees; check the sensor's wiring"
        )
    return _check_millidegrees(int(stripped), device)


def _check_millidegrees(milli: int, device: str) -> float:
    if milli == _POWER_ON_MILLI:
        raise _TransientError(
            f"sensor {device} returned 85.0 °C, the power-on value: check its power wiring "
            "(3.3 V on VDD, not parasite power)"
        )
    if milli == _BUS_FAULT_MILLI:
        raise SensorError(
            f"sensor {device} returned 127.94 °C, the value of an all-ones read: insufficient "
            "power or a bus fault: check 3.3 V on VDD, GND, and the 4.7 kΩ pull-up"
        )
    celsius = milli / 1000
    low, high = _RANGE_C
    if not low <= celsius <= high:
        raise SensorError(
            f"sensor {device} returned {celsius} °C, outside the DS18B20's {low:g}..{high:g} °C: "
            "check that the device is a genuine DS18B20 and its power wiring"
        )
    return celsius


class DS18B20(ClosingContext):
    """One DS18B20 on the kernel's 1-Wire bus.

    Each read takes the kernel about 750 ms (a 12-bit conversion). Transient failures (a CRC
    error, all-zero data, the power-on 85.0 °C, an I/O error) are retried ``retries`` times,
    ``retry_delay_s`` apart.
    """

    KIND: ClassVar[Kind] = KINDS["ds18b20"]
    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("device", str, help="its 1-Wire id (28-...) when id is a friendly name"),
    )
    MIN_INTERVAL_S: ClassVar[float] = 0.01

    @classmethod
    def settle(cls, where: str, sensor_id: str, settings: dict[str, object]) -> None:
        """``device`` defaults to the id, and must be a DS18B20's 1-Wire id.

        Raises:
            ConfigError: it is not (``where.device`` and the value).
        """
        device = settings.get("device") or sensor_id
        if not isinstance(device, str) or not _DEVICE_ID.fullmatch(device):
            raise ConfigError(
                f"{where}.device = {device!r} is not a DS18B20 1-Wire id like "
                "28-0316a2b4c5ff: run `edge-agent detect`, and give a friendly name in id"
            )
        settings["device"] = device

    @classmethod
    def from_settings(cls, sensor_id: str, settings: Settings, *, w1_root: Path) -> Sensor:
        sensor = cls(settings.text("device") or sensor_id, root=w1_root)
        return sensor if sensor.id == sensor_id else Named(sensor, sensor_id)

    def __init__(
        self,
        device_id: str,
        *,
        root: Path = W1_ROOT,
        retries: int = 3,
        retry_delay_s: float = 0.75,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Set up the sensor; touches no file until :meth:`read`.

        Raises:
            ConfigError: ``device_id`` is not a DS18B20 id (``28-`` and 12 lowercase hex
                digits, as in ``/sys/bus/w1/devices``), or ``retries``/``retry_delay_s`` is
                negative.
        """
        check_sensor_id(device_id)
        if not _DEVICE_ID.fullmatch(device_id):
            raise ConfigError(
                f"sensor id {device_id!r} is not a DS18B20: expected '28-' and 12 lowercase hex "
                f"digits, as listed by `ls {root}` (other 1-Wire families are not supported)"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(
                f"sensor {device_id}: retries must be an integer >= 0, not {retries!r}"
            )
        if not retry_delay_s >= 0:
            raise ConfigError(
                f"sensor {device_id}: retry_delay_s must be >= 0, not {retry_delay_s!r}"
            )
        self._id = device_id
        self._root = root
        self._retries = retries
        self._retry_delay_s = float(retry_delay_s)
        self._sleep = sleep
        self._closed = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def kind(self) -> str:
        return self.KIND.name

    def read(self) -> Sample:
        """Read the temperature, from ``temperature`` if the kernel has it, else ``w1_slave``.

        Raises:
            SensorError: the device is not on the bus, or every attempt failed (the message is
                the last failure's), or a non-transient fault (127.94 °C, out of range), or
                the sensor was closed.
        """
        if self._closed:
            raise SensorError(f"sensor {self._id} is closed")
        attempts = self._retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return Sample(self._read_once())
            except _TransientError as exc:
                if attempt == attempts:
                    raise SensorError(f"{exc} (gave up after {attempts} attempts)") from exc
            self._sleep(self._retry_delay_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Nothing to release (every read opens and closes its file); later reads fail."""
        self._closed = True

    def _read_once(self) -> float:
        directory = self._root / self._id
        attribute = directory / "temperature"
        path = attribute if attribute.exists() else directory / "w1_slave"
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError as exc:
            raise SensorError(self._not_found()) from exc
        except OSError as exc:
            # The kernel answers EIO/ENXIO/ENODEV when the slave disappears mid-read or, for
            # the temperature attribute, fails its CRC check.
            raise _TransientError(
                f"sensor {self._id}: reading {path} failed ({exc.strerror or exc}): the sensor "
                "may be dropping off the bus: check its wiring and the 4.7 kΩ pull-up"
            ) from exc
        if path is attribute:
            return parse_temperature(text, self._id)
        return parse_w1_slave(text, self._id)

    def _not_found(self) -> str:
        message = (
            f"sensor {self._id} not found on the 1-Wire bus: check its wiring and `ls {self._root}`"
        )
        if not self._root.is_dir():
            message += f" ({self._root} does not exist: is `dtoverlay=w1-gpio` in config.txt?)"
        return message
