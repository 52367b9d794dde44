"""Is the system clock right? The kernel knows: adjtimex, as `timedatectl` asks it.

A Raspberry Pi has no real-time clock. After a power cut without network it boots with the
time fake-hwclock saved at shutdown (or 1970) and keeps it until NTP synchronises. The agent
asks the kernel whether the clock is synchronised before it trusts a reading's time, and
records CLOCK_BOOTTIME with every reading so a held reading's time can be corrected later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["ClockSource", "KernelClock", "kernel_clock_synchronized"]

_STA_UNSYNC = 0x0040
_TIME_ERROR = 5
# systemd (timedatectl's "System clock synchronized") also calls a clock with an estimated
# maximum error of 16 s or more unsynchronised.
_MAX_ERROR_US = 16_000_000


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; the trailing padding is part of the kernel ABI.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


def kernel_clock_synchronized() -> bool:
    """True when the kernel says the clock is synchronised (read-only adjtimex call).

    Returns False where the call is unavailable (not Linux): the agent then holds readings
    only if the configuration requires a synchronised clock.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    timex = _Timex()  # modes = 0: read, change nothing
    state = libc.adjtimex(ctypes.byref(timex))
    if state < 0 or state == _TIME_ERROR:
        return False
    return not (timex.status & _STA_UNSYNC) and timex.maxerror < _MAX_ERROR_US


class ClockSource(Protocol):
    def synchronized(self) -> bool: ...
    def wall(self) -> float: ...
    def boottime(self) -> float: ...
    def boot_id(self) -> str: ...


@dataclass
class KernelClock:
    """The real clocks. ``assume_synced`` skips the kernel check (simulator on a laptop)."""

    assume_synced: bool = False

    def synchronized(self) -> bool:
        return self.assume_synced or kernel_clock_synchronized()

    def wall(self) -> float:
        return time.time()

    def boottime(self) -> float:
        # Counts through suspend, unlike CLOCK_MONOTONIC; restarts at every boot.
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def boot_id(self) -> str:
        try:
            return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return "unknown-boot"
