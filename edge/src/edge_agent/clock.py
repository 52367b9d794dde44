"""Is the system clock right? Ask the kernel; inside systemd's sandbox, ask what systemd offers.

A Raspberry Pi has no real-time clock. After a power cut without network it boots with the
time fake-hwclock saved at shutdown (or 1970) and keeps it until NTP synchronises. The agent
asks whether the clock is synchronised before it trusts a reading's time, and records
CLOCK_BOOTTIME with every reading so a held reading's time can be corrected later.

Where the answer comes from, in this order:

1. The kernel, through a read-only ``adjtimex`` call, as ``timedatectl`` itself asks it. It is
   authoritative whichever NTP daemon disciplines the clock (timesyncd, chrony, ntpd).
2. The agent's systemd unit refuses that call: ``SystemCallFilter=@system-service`` leaves out
   ``adjtimex`` and ``clock_adjtime`` (they are in ``@clock``, systemd 252), and
   ``SystemCallErrorNumber=EPERM`` makes them fail with EPERM. The filter is for the life of the
   process, so after the first refusal (EPERM, or ENOSYS where there is no such call) the
   agent stops asking the kernel and asks what systemd offers an unprivileged, sandboxed
   process:

   a. systemd-timesyncd's flag file ``/run/systemd/timesync/synchronized``, which timesyncd
      touches at every successful synchronisation (systemd-timesyncd.service(8); Raspberry Pi
      OS uses timesyncd). /run is a tmpfs, so the file means "synchronised since this boot".
      One ``stat`` per question.
   b. ``timedatectl show --property=NTPSynchronized --value``: systemd-timedated answers over
      D-Bus after asking the kernel with its own rights, so this works with chrony or ntpd as
      well. It is a subprocess, so it runs with a short timeout and its answer is kept for a
      few seconds: a reading never waits for it more than once in that time.

A held reading's time can be corrected from CLOCK_BOOTTIME only within the boot it was taken
in, so each reading also records the kernel's boot id. The kernel tells it in
``/proc/sys/kernel/random/boot_id``; the agent's unit hides /proc/sys (``ProcSubset=pid``), so
the unit hands the same id over in ``$EDGE_BOOT_ID`` (``Environment=EDGE_BOOT_ID=%b``: systemd
fills in the boot id when it loads the unit, and it loads it again at every boot). Without
either, the agent makes up an id for its own lifetime: a reading it holds is then corrected
within this run, and one left over from an earlier run is flagged ``time_uncertain`` instead
of being given a time computed from another boot's clock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

__all__ = [
    "BOOT_ID_ENV",
    "BOOT_ID_FILE",
    "RUN_DIR",
    "TIMEDATECTL",
    "TIMESYNC_FLAG",
    "ClockSource",
    "KernelClock",
    "KernelTime",
    "kernel_clock_synchronized",
    "read_adjtimex",
    "synchronized_from_timex",
]

log = logging.getLogger(__name__)

RUN_DIR = Path("/run")
"""The runtime directory; tests point :class:`KernelClock` at a temp dir instead."""

TIMESYNC_FLAG = Path("systemd/timesync/synchronized")
"""systemd-timesyncd's flag file, relative to :data:`RUN_DIR`."""

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
"""The kernel's id of the current boot (random(4)); hidden under the unit's ``ProcSubset=pid``."""

BOOT_ID_ENV = "EDGE_BOOT_ID"
"""The boot id as the unit passes it (``Environment=EDGE_BOOT_ID=%b``), when /proc/sys is hidden."""

TIMEDATECTL: tuple[str, ...] = ("timedatectl",)
"""The command that asks systemd-timedated; the agent appends its ``show`` arguments."""

_STA_UNSYNC = 0x0040
_TIME_ERROR = 5
# systemd (timedatectl's "System clock synchronized") also calls a clock with an estimated
# maximum error of 16 s or more unsynchronised.
_MAX_ERROR_US = 16_000_000
# A seccomp filter refuses with EPERM (systemd's SystemCallErrorNumber=EPERM); ENOSYS where the
# call does not exist (a filter's default, or not Linux). Either is for the process's lifetime.
_REFUSED = frozenset({errno.EPERM, errno.ENOSYS})


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


class KernelTime(NamedTuple):
    """What a read-only ``adjtimex`` call reports."""

    state: int
    """The return value: TIME_OK (0) ... TIME_ERROR (5)."""
    status: int
    """The STA_* bits."""
    maxerror_us: int
    """The kernel's estimate of the maximum error, in microseconds."""


@functools.cache
def _libc() -> ctypes.CDLL:
    # Once per process: find_library runs ldconfig, far too slow for every reading.
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True)


def read_adjtimex() -> KernelTime:
    """Ask the kernel about its clock with ``adjtimex`` (modes 0: read, change nothing).

    Raises:
        OSError: the call failed; ``errno`` EPERM when a seccomp filter refuses it (systemd's
            ``SystemCallFilter=@system-service``), ENOSYS where there is no such call (not
            Linux, or no C library found).
    """
    try:
        adjtimex = _libc().adjtimex
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "adjtimex is not available here") from None
    timex = _Timex()
    state = int(adjtimex(ctypes.byref(timex)))
    if state < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"adjtimex: {os.strerror(code)}")
    return KernelTime(state, int(timex.status), int(timex.maxerror))


def synchronized_from_timex(kernel: KernelTime) -> bool:
    """The kernel's answer as timedatectl reads it: synchronised, with a bounded error."""
    if kernel.state == _TIME_ERROR:
        return False
    return not (kernel.status & _STA_UNSYNC) and kernel.maxerror_us < _MAX_ERROR_US


def kernel_clock_synchronized(adjtimex: Callable[[], KernelTime] = read_adjtimex) -> bool:
    """True when the kernel says the clock is synchronised.

    False when the kernel cannot be asked (a seccomp filter, or not Linux): use
    :class:`KernelClock`, which then asks systemd instead.
    """
    try:
        return synchronized_from_timex(adjtimex())
    except OSError:
        return False


class ClockSource(Protocol):
    def synchronized(self) -> bool: ...
    def wall(self) -> float: ...
    def boottime(self) -> float: ...
    def boot_id(self) -> str: ...


class KernelClock:
    """The real clocks, and whether the wall clock is synchronised (see the module's docstring).

    ``assume_synced`` skips every check (the simulator on a laptop). ``run_dir`` and
    ``timedatectl`` say where systemd-timesyncd's flag file lives and how to run timedatectl;
    ``adjtimex`` is the kernel call; ``boot_id_file`` and ``environ`` are where the boot id
    comes from (see the module's docstring). Tests replace them; the defaults are the real ones.
    ``synchronized()`` is called for every reading from several threads: it is cheap and
    thread-safe, and at most one thread at a time waits for timedatectl.

    Raises:
        ValueError: ``timedatectl_timeout_s`` is not positive, ``cache_s`` is negative, or
            ``timedatectl`` is empty.
    """

    def __init__(
        self,
        *,
        assume_synced: bool = False,
        run_dir: Path = RUN_DIR,
        timedatectl: Sequence[str] = TIMEDATECTL,
        timedatectl_timeout_s: float = 3.0,
        cache_s: float = 5.0,
        adjtimex: Callable[[], KernelTime] = read_adjtimex,
        boot_id_file: Path = BOOT_ID_FILE,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not timedatectl_timeout_s > 0:
            raise ValueError(f"timedatectl_timeout_s must be positive, not {timedatectl_timeout_s}")
        if not cache_s >= 0:
            raise ValueError(f"cache_s must be 0 or more, not {cache_s}")
        if not timedatectl:
            raise ValueError("timedatectl must name a command")
        self.assume_synced = assume_synced
        self.run_dir = run_dir
        self.timedatectl = tuple(timedatectl)
        self.timedatectl_timeout_s = timedatectl_timeout_s
        self.cache_s = cache_s
        self._adjtimex = adjtimex
        self._boot_id_file = boot_id_file
        self._environ = os.environ if environ is None else environ
        self._boot_id: str | None = None
        self._kernel_refused = False
        self._source: str | None = None
        self._timedatectl_failed = False
        self._cached: tuple[float, bool] | None = None  # (monotonic time, answer)
        self._asking = threading.Lock()  # one timedatectl at a time
        self._state_lock = threading.Lock()

    @property
    def timesync_flag(self) -> Path:
        return self.run_dir / TIMESYNC_FLAG

    def synchronized(self) -> bool:
        if self.assume_synced:
            return True
        if not self._kernel_refused:
            try:
                return synchronized_from_timex(self._adjtimex())
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    # Not a refusal (a read-only call should not fail otherwise): ask systemd
                    # this time, and the kernel again next time.
                    log.debug("adjtimex failed, asking systemd instead: %s", exc)
                    return self._systemd_synchronized()
                self._kernel_refused_by(exc)
        return self._systemd_synchronized()

    def _kernel_refused_by(self, exc: OSError) -> None:
        with self._state_lock:
            if self._kernel_refused:
                return
            self._kernel_refused = True
        log.info(
            "the kernel refuses adjtimex (%s: a seccomp filter such as the unit's "
            "SystemCallFilter=@system-service): the clock check asks systemd instead, first "
            "%s (systemd-timesyncd), then `%s show --property=NTPSynchronized`",
            errno.errorcode.get(exc.errno or 0, exc.errno),
            self.timesync_flag,
            " ".join(self.timedatectl),
        )

    def _systemd_synchronized(self) -> bool:
        # os.path.exists, not Path.exists: a directory we may not search counts as no flag
        # instead of raising into a sampler thread.
        if os.path.exists(self.timesync_flag):  # noqa: PTH110
            self._note_source("timesyncd")
            return True
        self._note_source("timedatectl")
        return self._timedatectl_synchronized()

    def _note_source(self, source: str) -> None:
        # The source changes a few times in a process's life (timesyncd's flag file appears at
        # its first sync), so this logs rarely, never per reading.
        if source == self._source:
            return
        with self._state_lock:
            if source == self._source:
                return
            self._source = source
        where = (
            f"{self.timesync_flag} is present"
            if source == "timesyncd"
            else f"no {self.timesync_flag}, so timedatectl decides"
        )
        log.info("clock check source=%s (%s)", source, where)

    def _timedatectl_synchronized(self) -> bool:
        cached = self._cached
        if cached is not None:
            taken, answer = cached
            if time.monotonic() - taken < self.cache_s:
                return answer
            if not self._asking.acquire(blocking=False):
                # Another thread is asking right now and its answer is due shortly: this
                # reading takes the previous answer rather than wait.
                return answer
        else:
            self._asking.acquire()
        try:
            cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self.cache_s:
                return cached[1]
            answer = self._ask_timedatectl()
            self._cached = (time.monotonic(), answer)
            return answer
        finally:
            self._asking.release()

    def _ask_timedatectl(self) -> bool:
        """systemd-timedated's NTPSynchronized, or False when it cannot be had.

        Anything but a clean ``yes`` counts as not synchronised: readings are then held,
        which is safe, rather than sent with a wrong time.
        """
        argv = [*self.timedatectl, "show", "--property=NTPSynchronized", "--value"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self.timedatectl_timeout_s,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            problem = f"no answer within {self.timedatectl_timeout_s:g} s"
        except OSError as exc:
            problem = f"cannot run {argv[0]}: {exc.strerror or exc}"
        else:
            answer = done.stdout.strip()
            if done.returncode == 0 and answer in ("yes", "no"):
                self._timedatectl_failed = False
                return answer == "yes"
            detail = (done.stderr.strip() or done.stdout.strip())[:200]
            problem = f"exit status {done.returncode}: {detail!r}"
        if not self._timedatectl_failed:
            self._timedatectl_failed = True
            log.warning(
                "cannot tell whether the clock is synchronised: `%s` failed (%s); readings "
                "are held until it answers yes or %s appears",
                " ".join(argv),
                problem,
                self.timesync_flag,
            )
        else:
            log.debug("timedatectl failed again: %s", problem)
        return False

    def wall(self) -> float:
        return time.time()

    def boottime(self) -> float:
        # Counts through suspend, unlike CLOCK_MONOTONIC; restarts at every boot.
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def boot_id(self) -> str:
        """The id of this boot, read once (it cannot change while the process lives).

        The kernel's file first, then ``$EDGE_BOOT_ID`` (both normalised to the kernel's
        dashed form, so a reading held across an upgrade of the unit still matches), then an
        id made up for this process (logged once as a warning). Never raises.
        """
        if self._boot_id is None:
            with self._state_lock:  # sampler threads ask at once: one answer for all
                if self._boot_id is None:
                    self._boot_id = self._find_boot_id()
        return self._boot_id

    def _find_boot_id(self) -> str:
        try:
            return str(uuid.UUID(self._boot_id_file.read_text(encoding="ascii").strip()))
        except (OSError, ValueError) as exc:  # ValueError: not a boot id (or not ASCII)
            problem = f"{self._boot_id_file}: {getattr(exc, 'strerror', None) or exc}"
        passed = self._environ.get(BOOT_ID_ENV, "").strip()
        if passed:
            try:
                return str(uuid.UUID(passed))
            except ValueError:
                problem += f"; ${BOOT_ID_ENV} is not a boot id"
        made_up = f"process-{uuid.uuid4()}"
        log.warning(
            "cannot tell which boot this is (%s): readings held for the clock are corrected "
            "only within this run; those left from an earlier run are sent flagged "
            "time_uncertain",
            problem,
        )
        return made_up
