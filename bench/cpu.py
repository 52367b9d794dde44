"""CPU time per process group, from /proc: where a benchmark's cycles went.

On a machine with two cores the consumer, the broker and the database compete for the same
CPU, so "readings per second" alone does not say what limits a run; CPU seconds per reading
for each party does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, session id, user + system CPU seconds) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # After the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime ...
    return int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0.0 if it is gone)."""
    stat = _stat(pid)
    return stat[2] if stat is not None else 0.0


def snapshot() -> dict[int, tuple[int, int, float]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                out[int(entry.name)] = stat
    return out


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split()[0])


class CpuMeter:
    """CPU seconds spent between :meth:`start` and :meth:`stop` by named groups of processes.

    A group is a set of root pids and their descendants, or (``sessions``) every process in a
    session led by one of the given pids. A thread samples /proc every ``interval`` seconds: a
    process that exits is counted up to its last sample.
    """

    def __init__(
        self, roots: Mapping[str, Iterable[int]], sessions: Mapping[str, Iterable[int]] = {}
    ) -> None:
        self._roots = {name: set(pids) for name, pids in roots.items()}
        self._sessions = {name: set(pids) for name, pids in sessions.items()}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._owner: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_root(self, name: str, pid: int) -> None:
        self._roots.setdefault(name, set()).add(pid)

    def _assign(self, snap: dict[int, tuple[int, int, float]]) -> None:
        for pid, (_ppid, sid, _) in snap.items():
            if pid in self._owner:
                continue
            session = next((n for n, sids in self._sessions.items() if sid in sids), None)
            if session is not None:  # a session wins over ancestry (servers the bench started)
                self._owner[pid] = session
                continue
            # The nearest root up the process's ancestry names its group: a consumer the
            # bench spawned is the consumer's, not the bench's, whatever the groups' order.
            walk, seen = pid, 0
            while walk > 1 and seen < 64:
                name = next((n for n, roots in self._roots.items() if walk in roots), None)
                if name is not None:
                    self._owner[pid] = name
                    break
                parent = snap.get(walk)
                if parent is None:
                    break
                walk, seen = parent[0], seen + 1

    def start(self, interval: float = 0.2) -> None:
        """Take the first sample, then sample every ``interval`` s until :meth:`stop`."""
        snap = snapshot()
        self._assign(snap)
        for pid, (_, _, cpu) in snap.items():
            if pid in self._owner:
                self._first[pid] = cpu
                self._last[pid] = cpu
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._sample_until_stopped, args=(interval,), daemon=True
        )
        self._thread.start()

    def _sample_until_stopped(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def sample(self) -> None:
        snap = snapshot()
        self._assign(snap)
        for pid, (_, _, cpu) in snap.items():
            if pid in self._owner:
                self._first.setdefault(pid, 0.0)  # born after start: all its CPU counts
                self._last[pid] = cpu

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        totals = dict.fromkeys((*self._roots, *self._sessions), 0.0)
        for pid, name in self._owner.items():
            if pid in self._last:
                totals[name] += self._last[pid] - self._first.get(pid, 0.0)
        return totals
