"""Fake hardware at its lowest layer, for tests and for trying the agent without a Pi.

:class:`FakeBME280Bus` is an I2C bus (the part of Blinka's ``busio.I2C`` that
``adafruit_bus_device`` uses) with one emulated BME280 on it: its chip id, its calibration
registers and its raw ADC registers, computed from the temperature, humidity and pressure it
is told to measure. The real ``adafruit_bme280`` library runs on top of it unchanged, the way
gpiozero's ``MockFactory`` stands in for the pins under real gpiozero devices.

For a real ``edge-agent run`` process, a directory on ``PYTHONPATH`` holding a ``board.py``
with ``I2C = edge_agent.sensors.fakes.board_i2c`` gives it this bus (the system tests do
that); ``EDGE_FAKE_BME280`` (``temperature_c,humidity_pct,pressure_hpa``) sets what it reads.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["CALIBRATION", "BME280Calibration", "FakeBME280Bus", "board_i2c"]

CHIP_ID: Final = 0x60
_REG_CALIB_00: Final = 0x88  # dig_T1 .. dig_P9: 24 bytes, then 0xA0 unused, 0xA1 dig_H1
_REG_CALIB_26: Final = 0xE1  # dig_H2 .. dig_H6: 7 bytes
_REG_CHIP_ID: Final = 0xD0
_REG_RESET: Final = 0xE0
_REG_STATUS: Final = 0xF3
_REG_PRESS: Final = 0xF7  # press_msb, press_lsb, press_xlsb, temp (3), hum_msb, hum_lsb
_RESET_WORD: Final = 0xB6


@dataclass(frozen=True, slots=True)
class BME280Calibration:
    """The trimming parameters a BME280 carries in its NVM (datasheet 4.2.2)."""

    t1: int
    t2: int
    t3: int
    p1: int
    p2: int
    p3: int
    p4: int
    p5: int
    p6: int
    p7: int
    p8: int
    p9: int
    h1: int
    h2: int
    h3: int
    h4: int
    h5: int
    h6: int

    def registers(self) -> dict[int, int]:
        """The bytes of registers 0x88..0xA1 and 0xE1..0xE7."""
        low = struct.pack(
            "<HhhHhhhhhhhh",
            self.t1, self.t2, self.t3,
            self.p1, self.p2, self.p3, self.p4, self.p5, self.p6, self.p7, self.p8, self.p9,
        )  # fmt: skip
        # 0xE4 holds H4[11:4], 0xE5 H4[3:0] (low nibble) and H5[3:0] (high nibble), 0xE6 H5[11:4].
        high = struct.pack(
            "<hBbBbb",
            self.h2,
            self.h3,
            self.h4 >> 4,
            (self.h4 & 0xF) | ((self.h5 & 0xF) << 4),
            self.h5 >> 4,
            self.h6,
        )
        regs = {_REG_CALIB_00 + i: b for i, b in enumerate(low)}
        regs[0xA0] = 0
        regs[0xA1] = self.h1
        regs.update({_REG_CALIB_26 + i: b for i, b in enumerate(high)})
        return regs


CALIBRATION: Final = BME280Calibration(
    # Temperature and pressure: the worked example of Bosch's BMP280 datasheet (3.12), whose
    # raw values 519888 and 415148 give 25.08 °C and 100653.27 Pa; humidity: a real chip's.
    t1=27504, t2=26435, t3=-1000,
    p1=36477, p2=-10685, p3=3024, p4=2855, p5=140, p6=-7, p7=15500, p8=-14600, p9=6000,
    h1=75, h2=362, h3=0, h4=313, h5=50, h6=30,
)  # fmt: skip


def _t_fine(cal: BME280Calibration, adc_t: int) -> int:
    """The datasheet's floating-point compensation (8.1), as the library computes it."""
    var1 = (adc_t / 16384.0 - cal.t1 / 1024.0) * cal.t2
    var2 = ((adc_t / 131072.0 - cal.t1 / 8192.0) ** 2) * cal.t3
    return int(var1 + var2)


def _pressure_pa(cal: BME280Calibration, t_fine: int, adc_p: int) -> float:
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * cal.p6 / 32768.0
    var2 += var1 * cal.p5 * 2.0
    var2 = var2 / 4.0 + cal.p4 * 65536.0
    var3 = cal.p3 * var1 * var1 / 524288.0
    var1 = (var3 + cal.p2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * cal.p1
    pressure = 1048576.0 - adc_p
    pressure = ((pressure - var2 / 4096.0) * 6250.0) / var1
    var1 = cal.p9 * pressure * pressure / 2147483648.0
    var2 = pressure * cal.p8 / 32768.0
    return pressure + (var1 + var2 + cal.p7) / 16.0


def _humidity_pct(cal: BME280Calibration, t_fine: int, adc_h: int) -> float:
    var1 = t_fine - 76800.0
    var2 = cal.h4 * 64.0 + (cal.h5 / 16384.0) * var1
    var4 = cal.h2 / 65536.0
    var5 = 1.0 + (cal.h3 / 67108864.0) * var1
    var6 = 1.0 + (cal.h6 / 67108864.0) * var1 * var5
    var6 = (adc_h - var2) * var4 * (var5 * var6)
    return var6 * (1.0 - cal.h1 * var6 / 524288.0)


def _invert(f: Callable[[int], float], target: float, top: int, *, rising: bool) -> int:
    """The raw ADC value in ``0..top`` whose compensated value is nearest ``target``
    (``f`` is monotonic: bisection)."""
    low, high = 0, top
    while high - low > 1:
        middle = (low + high) // 2
        if (f(middle) < target) == rising:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda raw: abs(f(raw) - target))


class FakeBME280Bus:
    """An I2C bus with one emulated BME280 at ``address``.

    Set :attr:`temperature_c`, :attr:`humidity_pct` and :attr:`pressure_hpa` to what the chip
    should measure (within its ADC's resolution), or :attr:`raw` to raw ADC values
    ``(adc_t, adc_p, adc_h)``. :attr:`fail` makes every transfer raise the kernel's
    ``OSError`` (EREMOTEIO, a chip that does not acknowledge); :attr:`chip_id` another chip's
    id (0x58 is a BMP280).
    """

    def __init__(
        self,
        *,
        address: int = 0x77,
        temperature_c: float = 21.5,
        humidity_pct: float = 45.0,
        pressure_hpa: float = 1013.25,
        chip_id: int = CHIP_ID,
        calibration: BME280Calibration = CALIBRATION,
    ) -> None:
        self.address = address
        self.temperature_c = temperature_c
        self.humidity_pct = humidity_pct
        self.pressure_hpa = pressure_hpa
        self.chip_id = chip_id
        self.calibration = calibration
        self.raw: tuple[int, int, int] | None = None
        self.fail = False
        self.writes: deque[tuple[int, int]] = deque(maxlen=64)
        """(register, value) of the latest register writes, in order."""
        self._written: dict[int, int] = {}
        self.deinit_calls = 0
        self._pointer = 0
        self._lock = threading.Lock()
        self._locked = False

    # -- what adafruit_bus_device.I2CDevice calls ----------------------------------------------
    def try_lock(self) -> bool:
        with self._lock:
            if self._locked:
                return False
            self._locked = True
            return True

    def unlock(self) -> None:
        with self._lock:
            self._locked = False

    def writeto(
        self, address: int, buffer: bytes | bytearray, *, start: int = 0, end: int | None = None
    ) -> None:
        self._check(address)
        data = bytes(buffer[start:end])
        if not data:  # the library's probe
            return
        self._pointer = data[0]
        for offset in range(0, len(data) - 1, 2):  # a write is (register, value) pairs
            register, value = data[offset], data[offset + 1]
            self.writes.append((register, value))
            if register != _REG_RESET:
                self._written[register] = value

    def readfrom_into(
        self, address: int, buffer: bytearray, *, start: int = 0, end: int | None = None
    ) -> None:
        self._check(address)
        end = len(buffer) if end is None else end
        registers = self._registers()
        for index in range(start, end):
            buffer[index] = registers.get(self._pointer, 0)
            self._pointer = (self._pointer + 1) & 0xFF

    def writeto_then_readfrom(
        self,
        address: int,
        buffer_out: bytes | bytearray,
        buffer_in: bytearray,
        *,
        out_start: int = 0,
        out_end: int | None = None,
        in_start: int = 0,
        in_end: int | None = None,
    ) -> None:
        self.writeto(address, buffer_out, start=out_start, end=out_end)
        self.readfrom_into(address, buffer_in, start=in_start, end=in_end)

    def deinit(self) -> None:
        self.deinit_calls += 1

    # -- the chip ----------------------------------------------------------------------------
    def _check(self, address: int) -> None:
        if self.fail:
            raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))
        if address != self.address:
            raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))

    def adc(self) -> tuple[int, int, int]:
        """The raw ``(adc_t, adc_p, adc_h)`` the chip reports for the set values."""
        if self.raw is not None:
            return self.raw
        cal = self.calibration
        adc_t = _invert(
            lambda raw: _t_fine(cal, raw) / 5120.0, self.temperature_c, 2**20 - 1, rising=True
        )
        t_fine = _t_fine(cal, adc_t)
        adc_p = _invert(
            lambda raw: _pressure_pa(cal, t_fine, raw) / 100.0,
            self.pressure_hpa,
            2**20 - 1,
            rising=False,
        )
        adc_h = _invert(
            lambda raw: _humidity_pct(cal, t_fine, raw), self.humidity_pct, 2**16 - 1, rising=True
        )
        return adc_t, adc_p, adc_h

    def _registers(self) -> dict[int, int]:
        adc_t, adc_p, adc_h = self.adc()
        registers = self.calibration.registers()
        registers[_REG_CHIP_ID] = self.chip_id
        registers[_REG_STATUS] = 0  # never measuring: a forced conversion is instant here
        data = [
            adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4,
            adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0xF) << 4,
            adc_h >> 8, adc_h & 0xFF,
        ]  # fmt: skip
        registers.update({_REG_PRESS + i: b for i, b in enumerate(data)})
        registers.update(self._written)
        return registers


def board_i2c() -> FakeBME280Bus:
    """``board.I2C`` for a fake ``board`` module: a fresh :class:`FakeBME280Bus`, measuring
    what ``EDGE_FAKE_BME280`` says (``temperature_c,humidity_pct,pressure_hpa``), and at the
    address ``EDGE_FAKE_BME280_ADDRESS`` (default 0x77)."""
    values = os.environ.get("EDGE_FAKE_BME280", "21.5,45.0,1013.25").split(",")
    temperature, humidity, pressure = (float(v) for v in values)
    address = int(os.environ.get("EDGE_FAKE_BME280_ADDRESS", "0x77"), 0)
    return FakeBME280Bus(
        address=address,
        temperature_c=temperature,
        humidity_pct=humidity,
        pressure_hpa=pressure,
    )
