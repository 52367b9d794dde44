"""The clock check: the kernel first; when a seccomp filter refuses adjtimex, what systemd offers.

The kernel call is a seam (a callable returning ``KernelTime`` or raising ``OSError`` with the
errno a seccomp filter gives); systemd-timesyncd's flag file lives under a ``run_dir`` in
``tmp_path``; timedatectl is a small shell script that answers as the real one does. One test
runs the real check in a child process under a real seccomp filter that refuses adjtimex, as
the agent's systemd unit does.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.clock import (
    BOOT_ID_ENV,
    TIMESYNC_FLAG,
    KernelClock,
    KernelTime,
    kernel_clock_synchronized,
    synchronized_from_timex,
)

SYNCED = KernelTime(state=0, status=0x2001, maxerror_us=450_000)  # TIME_OK, STA_PLL|STA_NANO
UNSYNCED = KernelTime(state=5, status=0x0040, maxerror_us=16_000_000)  # TIME_ERROR, STA_UNSYNC


class Kernel:
    """A fake adjtimex: answers ``time`` or raises ``OSError(code)``; counts the calls."""

    def __init__(self, time: KernelTime | None = None, *, code: int | None = None) -> None:
        self.time = time
        self.code = code
        self.calls = 0

    def __call__(self) -> KernelTime:
        self.calls += 1
        if self.code is not None:
            raise OSError(self.code, os.strerror(self.code))
        assert self.time is not None
        return self.time


class Timedatectl:
    """A fake ``timedatectl`` script in tmp_path; each run is logged with its arguments."""

    def __init__(self, directory: Path, body: str = "echo yes") -> None:
        self.path = directory / "timedatectl"
        self.log = directory / "timedatectl.log"
        self.answer(body)

    def answer(self, body: str) -> None:
        self.path.write_text(f'#!/bin/sh\necho "$*" >> "{self.log}"\n{body}\n')
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR)

    @property
    def runs(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def set_flag(run_dir: Path) -> None:
    """What systemd-timesyncd does at each successful synchronisation."""
    flag = run_dir / TIMESYNC_FLAG
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()


def clock(
    tmp_path: Path, kernel: Callable[[], KernelTime], tool: Timedatectl | Path, **kw: float
) -> KernelClock:
    command = tool.path if isinstance(tool, Timedatectl) else tool
    return KernelClock(run_dir=tmp_path / "run", timedatectl=[str(command)], adjtimex=kernel, **kw)


# --- the kernel's answer ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "synced"),
    [
        (SYNCED, True),
        (UNSYNCED, False),
        (KernelTime(0, 0x0001, 1_000), True),  # TIME_OK, STA_PLL
        (KernelTime(1, 0x0011, 1_000), True),  # TIME_INS: a leap second is coming, still synced
        (KernelTime(5, 0x0001, 1_000), False),  # TIME_ERROR
        (KernelTime(0, 0x0041, 1_000), False),  # STA_UNSYNC
        (KernelTime(0, 0x0001, 16_000_000), False),  # maxerror 16 s: systemd's limit
        (KernelTime(0, 0x0001, 15_999_999), True),
    ],
)
def test_synchronized_from_timex(kernel: KernelTime, synced: bool) -> None:
    assert synchronized_from_timex(kernel) is synced


def test_the_kernel_decides_when_it_answers(tmp_path: Path) -> None:
    tool = Timedatectl(tmp_path, "echo yes")
    set_flag(tmp_path / "run")
    assert clock(tmp_path, Kernel(SYNCED), tool).synchronized() is True
    # The flag file and timedatectl say yes, but the kernel is authoritative.
    assert clock(tmp_path, Kernel(UNSYNCED), tool).synchronized() is False
    assert tool.runs == []


def test_kernel_clock_synchronized_is_false_when_refused() -> None:
    assert kernel_clock_synchronized(Kernel(SYNCED)) is True
    assert kernel_clock_synchronized(Kernel(code=errno.EPERM)) is False


def test_assume_synced_asks_nobody(tmp_path: Path) -> None:
    kernel = Kernel(code=errno.EPERM)
    tool = Timedatectl(tmp_path, "echo no")
    assert clock(tmp_path, kernel, tool).synchronized() is False
    kernel.calls = 0
    trusting = KernelClock(assume_synced=True, adjtimex=kernel, timedatectl=[str(tool.path)])
    assert trusting.synchronized() is True
    assert kernel.calls == 0
    assert len(tool.runs) == 1


# --- refused: the flag file, then timedatectl -----------------------------------------------


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOSYS])
def test_refused_then_the_flag_file_decides(tmp_path: Path, code: int) -> None:
    kernel = Kernel(code=code)
    tool = Timedatectl(tmp_path, "echo no")
    set_flag(tmp_path / "run")
    subject = clock(tmp_path, kernel, tool)
    assert [subject.synchronized() for _ in range(5)] == [True] * 5
    assert tool.runs == [], "the flag file answered: no subprocess"
    # A seccomp filter lasts as long as the process: the kernel is asked once.
    assert kernel.calls == 1


def test_refused_without_flag_file_timedatectl_decides(tmp_path: Path) -> None:
    tool = Timedatectl(tmp_path, "echo yes")
    subject = clock(tmp_path, Kernel(code=errno.EPERM), tool, cache_s=0)
    assert subject.synchronized() is True
    tool.answer("echo no")
    assert subject.synchronized() is False
    assert tool.runs == ["show --property=NTPSynchronized --value"] * 2
    # timesyncd synchronises: its flag file answers from now on.
    set_flag(tmp_path / "run")
    assert subject.synchronized() is True
    assert len(tool.runs) == 2


def test_another_error_asks_systemd_once_and_the_kernel_again(tmp_path: Path) -> None:
    kernel = Kernel(code=errno.EINVAL)
    tool = Timedatectl(tmp_path, "echo yes")
    subject = clock(tmp_path, kernel, tool, cache_s=0)
    assert subject.synchronized() is True
    kernel.code, kernel.time = None, UNSYNCED
    assert subject.synchronized() is False
    assert kernel.calls == 2


@pytest.mark.parametrize(
    "body",
    [
        "echo no",
        "echo maybe",
        "echo",
        "printf 'yes\\nno\\n'",
        "echo 'Failed to connect to bus: No such file or directory' >&2; exit 1",
        "echo yes; exit 1",
        "kill -9 $$",
    ],
    ids=["no", "garbage", "empty", "two-lines", "no-bus", "yes-but-failed", "killed"],
)
def test_timedatectl_anything_but_yes_is_not_synchronised(tmp_path: Path, body: str) -> None:
    tool = Timedatectl(tmp_path, body)
    assert clock(tmp_path, Kernel(code=errno.EPERM), tool).synchronized() is False
    assert len(tool.runs) == 1


def test_timedatectl_missing_is_not_synchronised(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "timedatectl"
    assert clock(tmp_path, Kernel(code=errno.EPERM), missing).synchronized() is False


def test_timedatectl_that_hangs_is_given_up(tmp_path: Path) -> None:
    tool = Timedatectl(tmp_path, "exec sleep 30")
    subject = clock(tmp_path, Kernel(code=errno.EPERM), tool, timedatectl_timeout_s=0.3)
    began = time.monotonic()
    assert subject.synchronized() is False
    assert time.monotonic() - began < 5


def test_timedatectl_answer_is_cached(tmp_path: Path) -> None:
    tool = Timedatectl(tmp_path, "echo no")
    subject = clock(tmp_path, Kernel(code=errno.EPERM), tool, cache_s=60)
    assert subject.synchronized() is False
    tool.answer("echo yes")
    assert [subject.synchronized() for _ in range(20)] == [False] * 20
    assert len(tool.runs) == 1
    # Past the cache time it asks again.
    short = clock(tmp_path, Kernel(code=errno.EPERM), tool, cache_s=0.2)
    tool.answer("echo no")
    assert short.synchronized() is False
    tool.answer("echo yes")
    time.sleep(0.3)
    assert short.synchronized() is True
    assert len(tool.runs) == 3


def test_readings_on_many_threads_run_timedatectl_once(tmp_path: Path) -> None:
    tool = Timedatectl(tmp_path, "sleep 0.3; echo yes")
    subject = clock(tmp_path, Kernel(code=errno.EPERM), tool, cache_s=60)
    answers: list[bool] = []
    threads = [
        threading.Thread(target=lambda: answers.append(subject.synchronized())) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers == [True] * 8
    assert len(tool.runs) == 1


def test_stale_answer_while_another_thread_asks(tmp_path: Path) -> None:
    tool = Timedatectl(tmp_path, "echo no")
    subject = clock(tmp_path, Kernel(code=errno.EPERM), tool, cache_s=0.1)
    assert subject.synchronized() is False
    tool.answer("sleep 1; echo yes")
    time.sleep(0.2)
    asking = threading.Thread(target=subject.synchronized)
    asking.start()
    time.sleep(0.3)  # the other thread now waits for timedatectl
    began = time.monotonic()
    assert subject.synchronized() is False, "the previous answer, without waiting"
    assert time.monotonic() - began < 0.5
    asking.join(10)
    assert subject.synchronized() is True


def test_logs_once_not_per_reading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tool = Timedatectl(tmp_path, "echo 'Failed to connect to bus' >&2; exit 1")
    subject = clock(tmp_path, Kernel(code=errno.EPERM), tool, cache_s=0)
    with caplog.at_level(logging.DEBUG, logger="edge_agent.clock"):
        for _ in range(5):
            subject.synchronized()
        set_flag(tmp_path / "run")
        for _ in range(5):
            subject.synchronized()
    above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert len(above_debug) == 4, above_debug
    refused, source_1, failed, source_2 = above_debug
    assert "refuses adjtimex (EPERM" in refused
    assert "SystemCallFilter=@system-service" in refused
    assert "source=timedatectl" in source_1
    assert "Failed to connect to bus" in failed
    assert "source=timesyncd" in source_2


@pytest.mark.parametrize(
    "settings",
    [{"timedatectl_timeout_s": 0}, {"cache_s": -1}, {"cache_s": float("nan")}],
)
def test_settings_are_checked(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(settings))):
        KernelClock(**settings)


# --- a real seccomp filter --------------------------------------------------------------------

# (AUDIT_ARCH_*, numbers of adjtimex and clock_adjtime) from the kernel's headers.
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, (159, 305)),
    "aarch64": (0xC00000B7, (171, 266)),
    "armv7l": (0x40000028, (124, 372, 405)),
}

# Installs a filter refusing adjtimex and clock_adjtime with EPERM (what systemd's
# SystemCallFilter=@system-service with SystemCallErrorNumber=EPERM does to them), then runs
# the agent's real clock check.
_UNDER_SECCOMP = textwrap.dedent(
    """
    import ctypes, errno, json, sys
    from pathlib import Path
    arch, numbers, run_dir = int(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                    ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    n = len(numbers)
    code = [Filter(LD_ABS, 0, 0, 4), Filter(JEQ, 0, n + 1, arch), Filter(LD_ABS, 0, 0, 0)]
    code += [Filter(JEQ, n - i, 0, nr) for i, nr in enumerate(numbers)]
    code += [Filter(RET, 0, 0, ALLOW), Filter(RET, 0, 0, ERRNO | errno.EPERM)]
    program = Program(len(code), (Filter * len(code))(*code))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        sys.exit(77)
    if libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        sys.exit(77)

    from edge_agent.clock import KernelClock, read_adjtimex
    try:
        read_adjtimex()
        refused = None
    except OSError as exc:
        refused = errno.errorcode[exc.errno]
    missing = str(run_dir / "no-timedatectl")
    before = KernelClock(run_dir=run_dir, timedatectl=[missing]).synchronized()
    flag = run_dir / "systemd/timesync/synchronized"
    flag.parent.mkdir(parents=True)
    flag.touch()
    after = KernelClock(run_dir=run_dir, timedatectl=[missing]).synchronized()
    print(json.dumps({"refused": refused, "before": before, "after": after}))
    """
)


def test_under_a_real_seccomp_filter_the_flag_file_decides(tmp_path: Path) -> None:
    if sys.platform != "linux" or platform.machine() not in _SECCOMP_ARCHES:
        pytest.skip(f"no seccomp syscall table here for {sys.platform} {platform.machine()}")
    arch, numbers = _SECCOMP_ARCHES[platform.machine()]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _UNDER_SECCOMP,
            str(arch),
            str(list(numbers)),
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 77:
        pytest.skip("this kernel does not let a process install a seccomp filter")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == '{"refused": "EPERM", "before": false, "after": true}'


# --- the boot id: the kernel's file, else what the unit passes (ProcSubset=pid hides /proc/sys) --

KERNEL_BOOT_ID = "3f1c1e2a-9b7d-4c55-8e0f-6a2b9d4e7c10"


def test_boot_id_from_the_kernel_file_wins(tmp_path: Path) -> None:
    boot_file = tmp_path / "boot_id"
    boot_file.write_text(KERNEL_BOOT_ID.upper() + "\n")
    clock = KernelClock(boot_id_file=boot_file, environ={BOOT_ID_ENV: "0" * 32})
    assert clock.boot_id() == KERNEL_BOOT_ID


@pytest.mark.parametrize("passed", [KERNEL_BOOT_ID.replace("-", ""), KERNEL_BOOT_ID])
def test_boot_id_from_the_unit_when_proc_sys_is_hidden(tmp_path: Path, passed: str) -> None:
    """systemd's %b has no dashes; it still matches readings stored with the kernel's form."""
    clock = KernelClock(boot_id_file=tmp_path / "hidden", environ={BOOT_ID_ENV: passed})
    assert clock.boot_id() == KERNEL_BOOT_ID


@pytest.mark.parametrize("environ", [{}, {BOOT_ID_ENV: "%b"}, {BOOT_ID_ENV: "yesterday"}])
def test_boot_id_made_up_for_the_process_when_nobody_tells(
    tmp_path: Path, environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Never one id shared by every boot: a reading of an earlier run must not be corrected."""
    caplog.set_level(logging.WARNING, logger="edge_agent.clock")
    first = KernelClock(boot_id_file=tmp_path / "hidden", environ=environ)
    second = KernelClock(boot_id_file=tmp_path / "hidden", environ=environ)
    ids = {first.boot_id() for _ in range(5)}
    assert len(ids) == 1, "one id for the life of the process"
    assert ids.pop().startswith("process-")
    assert first.boot_id() != second.boot_id()
    warnings = [r for r in caplog.records if "cannot tell which boot" in r.getMessage()]
    assert len(warnings) == 2  # once per clock, not per reading


def test_boot_id_of_this_machine() -> None:
    boot_file = Path("/proc/sys/kernel/random/boot_id")
    if not boot_file.exists():
        pytest.skip("no /proc/sys/kernel/random/boot_id here (not Linux)")
    assert KernelClock(environ={}).boot_id() == boot_file.read_text().strip()


def test_boot_id_asked_from_many_threads_at_once(tmp_path: Path) -> None:
    clock = KernelClock(boot_id_file=tmp_path / "hidden", environ={})
    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(clock.boot_id())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(answers)) == 1
