"""The durable outbox: every reading is in SQLite before it is sent, and leaves only on PUBACK.

SQLite in WAL mode with ``synchronous=FULL``: a committed reading survives a power cut. The
row id is the node's sequence number, and ``(node, sensor, seq)`` is the reading's key in the
pipeline, which takes a second reading under a key it already has for a duplicate and drops it.
So a number must never be handed out twice, not even by another SD card of the same node.

Sequence numbers
    ``AUTOINCREMENT`` never hands out an id twice, even after the rows are deleted. A new
    outbox does not start at 1 (a new card would reuse the old card's numbers); where it starts
    depends on whether the wall clock is synchronised when the file is created (the
    ``clock_synced`` argument; the agent passes its clock's answer):

    * synchronised: at the time in microseconds. A node takes far fewer than one reading per
      microsecond, so a card created later starts beyond every number an earlier card used.
    * not synchronised (a Pi without network after a power cut keeps the time saved at its last
      shutdown, and cards flashed from one image all start from that image's time): at a random
      point of ``[2**62, 2**63 - 2**40)``. That range lies above any time-based start (the time
      in microseconds reaches 2**62 in the year 148,000), leaves room for 2**40 readings below
      the wire format's maximum of 2**63 - 1, and is so wide that two cards with a billion
      readings each overlap with a probability of about 1 in 2 billion.

    An existing outbox is never seeded again. A recovered one continues above the damaged
    one's numbers (see below).

Bounds
    :meth:`Outbox.enforce_bounds` drops readings older than ``max_age_s`` and then the oldest
    beyond ``max_rows``, and adds them to ``dropped_total`` (shown by ``edge-agent status`` and
    in the heartbeat). A reading's age is its real age, never what a wrong wall clock made of it:

    * a reading of the current boot: ``CLOCK_BOOTTIME`` now minus ``CLOCK_BOOTTIME`` when
      taken, exact whatever the wall clock says, held readings included;
    * a reading of an earlier boot with a certain time (``ts`` set, not ``time_uncertain``):
      the wall clock now minus ``ts``, and only while the clock is synchronised;
    * a reading of an earlier boot whose time is uncertain (or still held): its age cannot be
      known, so it is never dropped for its age; ``max_rows`` still bounds it.

Clock
    A reading taken while the clock was not synchronised is stored with ``ts`` NULL: it is held
    until :meth:`Outbox.resolve_held` corrects its time from CLOCK_BOOTTIME (same boot) or,
    past the hold limit or after a reboot, releases it flagged as ``time_uncertain``.

Damage
    A worn SD card, or a power cut with a write cache that lied, can leave pages of the file
    unreadable: SQLite then says "database disk image is malformed" (``SQLITE_CORRUPT``) or
    "file is not a database" (``SQLITE_NOTADB``). Every such error (those codes and their
    extended codes, nothing else: a constraint failure says nothing about the file), from any
    method, becomes :class:`OutboxCorrupt` naming the file and SQLite's message, and leaves a
    marker file ``<name>.needs-recovery`` next to it. The agent then stops with exit code 75
    and systemd starts it again; the readings it could not store meanwhile are counted into the
    marker (:meth:`Outbox.note_not_stored`). When an :class:`Outbox` opens an existing file
    (``recover=True``, the agent), it runs ``PRAGMA quick_check`` (about 0.2 s for a million
    rows from the page cache, 2 s from disk, on the test machines) and, if that fails or the
    marker is there, recovers:

    * every reading that can still be read (from the file and its ``-wal``) goes into a new
      outbox, ``<name>.recovering``, with its sequence number, time, ``time_uncertain`` flag
      and the rest, and so does the ``meta`` table (the MQTT client token, the counters), in
      one transaction;
    * the new sequence continues after the old counter, or, if that cannot be read, 2**32
      above the highest number seen (numbers above it may have been sent already; less only
      within 2**32 of the wire format's maximum, never below a number seen) or at a new seed,
      whichever is higher; a file nothing can be read from gets a new seed;
    * the damaged file is renamed to ``<name>.corrupt-<UTC time>`` and kept, its ``-wal`` and
      ``-shm`` follow it, the new outbox takes its place, the marker goes. A power cut at any
      step is safe: the marker first gets the kept name and the new counter (a journal), the
      damaged file moves before its log, and the next start finishes the job (the log still at
      the path's names follows the damaged file before anything opens the path, the complete
      new outbox is put in place) or does it all again from the untouched damaged file, never
      below the journal's counter. Only the newest :data:`KEEP_DAMAGED` damaged files are
      kept, older ones are deleted (and logged), so a failing card does not fill up;
    * ``dropped_total`` gets the readings lost and those not stored. The lost ones are exact
      when the damaged file can still count its rows; when a damaged leaf keeps it from
      counting (``count(*)`` reads every leaf), only bounds are known: at least the garbled
      rows plus one reading for each damaged stretch between readable ones (that much is
      certain, and is what is counted), at most every number skipped. Both are in the log
      line and in ``last_outbox_recovery``; gaps are not counted as lost, because readings
      already acknowledged leave gaps too. ``outbox_recoveries`` counts the recoveries.

    A salvage that cannot finish (a full card) does not keep the agent from starting: the
    damaged file is moved aside all the same, an empty outbox starts above its numbers with
    its meta table, an ERROR is logged and ``last_outbox_recovery`` says the salvage is
    pending; the next start tries the salvage again, into the running outbox.

    A million readings with a few damaged pages take about 5 s to recover on the test machines.
    ``edge-agent status`` (``recover=False``) never checks or moves the file.

The outbox also keeps the secret half of the node's MQTT client id (:meth:`Outbox.client_token`):
it belongs to this node's durable state, and no other node can read it.

Each thread gets its own connection; SQLite serialises the writers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from edge_agent.errors import EdgeError
from tempmon_contract.ids import ID
from tempmon_contract.kinds import HUMIDITY, PRESSURE, TEMPERATURE

__all__ = [
    "CLIENT_TOKEN_BYTES",
    "KEEP_DAMAGED",
    "RANDOM_SEED_RANGE",
    "SEQ_MAX",
    "Outbox",
    "OutboxCorrupt",
    "OutboxError",
    "OutboxFull",
    "Pending",
    "Recovery",
]

log = logging.getLogger(__name__)

CLIENT_TOKEN_BYTES: Final = 16
"""Random bytes in a client-id token: 128 bits, written as 32 lowercase hex digits."""
_CLIENT_TOKEN: Final = re.compile(r"[0-9a-f]{32}")
_CLIENT_TOKEN_KEY: Final = "mqtt_client_token"  # noqa: S105 - a meta key, not a secret

SEQ_MAX: Final = 2**63 - 1
"""The highest sequence number the wire format (and PostgreSQL's bigint) can carry."""
RANDOM_SEED_RANGE: Final = (2**62, 2**63 - 2**40)
"""``[low, high)``: where a new outbox starts counting when the clock is not synchronised."""
_UNKNOWN_COUNTER_MARGIN: Final = 2**32
"""How far above the highest number seen a recovered outbox starts when the old counter is lost."""

KEEP_DAMAGED: Final = 3
"""How many damaged files (``<name>.corrupt-<UTC>``) are kept; older ones are deleted."""

_MARKER_SUFFIX: Final = ".needs-recovery"
_BUILDING_SUFFIX: Final = ".recovering"
_KEPT_SUFFIX: Final = re.compile(r"(\.corrupt-(\d{8}T\d{6}Z)(?:-(\d+))?)(?:-wal|-shm)?")
_DIGITS: Final = re.compile(r"[0-9]{1,20}")
_PENDING_KEY: Final = "salvage_pending"
"""Meta key: the kept damaged files (a JSON list of names) whose salvage is still to be done."""
_RECOVERED_FROM_KEY: Final = "recovered_from"
"""Meta key: the kept name of the damaged file this outbox was recovered from."""
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26
_SALVAGE_CHUNK: Final = 10_000
_ID: Final = ID
_META_KEYS: Final = (
    _CLIENT_TOKEN_KEY,
    "dropped_total",
    "last_puback_at",
    "read_errors",
    "puback_timeouts",
    "puback_timeout_publishes",
    "last_puback_timeout_at",
    "outbox_recoveries",
    "last_outbox_recovery",
    _PENDING_KEY,
    _RECOVERED_FROM_KEY,
)
"""The meta keys the agent writes: tried one by one when the meta table cannot be read whole."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    sensor         TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    ts             REAL,               -- UTC seconds; NULL while held for the clock
    wall           REAL    NOT NULL,   -- the wall clock when taken, right or wrong
    boot_id        TEXT    NOT NULL,
    boottime       REAL    NOT NULL,   -- CLOCK_BOOTTIME when taken
    uncertain      INTEGER NOT NULL DEFAULT 0,
    temperature_c  REAL    NOT NULL,
    humidity_pct   REAL,
    pressure_hpa   REAL                -- schema version 2
);
CREATE INDEX IF NOT EXISTS outbox_held ON outbox (seq) WHERE ts IS NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""
SCHEMA_VERSION: Final = 2
"""``PRAGMA user_version`` of the outbox file. 1 (stored as 0: the files written before it had
a version) has no ``pressure_hpa``; 2 adds it. An older file is migrated when it is opened
(:func:`_migrate`: ``ALTER TABLE ... ADD COLUMN``, which rewrites no row), so the outbox of a
Pi that is upgraded keeps its readings and drains them."""
_COLUMNS: Final = (
    "seq, sensor, kind, ts, wall, boot_id, boottime, uncertain, temperature_c, humidity_pct,"
    " pressure_hpa"
)
_COLUMNS_V1: Final = (
    "seq, sensor, kind, ts, wall, boot_id, boottime, uncertain, temperature_c, humidity_pct, NULL"
)
"""What a salvage reads from a damaged file of schema version 1 (no pressure)."""
_INSERT_ROW: Final = "?, " * 10 + "?"


class OutboxError(EdgeError, OSError):
    """The outbox file cannot be opened or written."""


class OutboxFull(OutboxError):  # noqa: N818 - reads as the state it reports
    """The disk holding the outbox is full; the reading was not stored."""


class OutboxCorrupt(OutboxError):  # noqa: N818 - reads as the state it reports
    """The outbox file is damaged: SQLite found a malformed page, or no database at all.

    The message names the file and SQLite's error. The agent stops on it (exit code 75) so that
    systemd starts it again, and the next :class:`Outbox` on the file recovers what it can.
    """


@dataclass(frozen=True, slots=True)
class Pending:
    """A reading ready to send."""

    seq: int
    sensor: str
    kind: str
    ts: float
    uncertain: bool
    temperature_c: float
    humidity_pct: float | None
    pressure_hpa: float | None = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What the recovery of a damaged outbox did (see the module's docstring)."""

    kept: Path
    """The damaged file, renamed aside and kept."""
    reason: str
    salvaged: int
    """Readings copied into the new outbox."""
    lost: int | None
    """Readings that could not be salvaged; None when the damaged file could not count them."""
    lost_at_most: int | None
    """With ``lost`` unknown: the sequence numbers skipped over, an upper bound (None: unknown)."""
    dropped: int
    """Added to ``dropped_total`` for the damaged file: ``lost`` when known, else its lower bound
    (the garbled rows, and one reading for each damaged stretch between readable ones)."""
    next_seq: int
    """The first sequence number the new outbox hands out."""
    not_stored: int = 0
    """Readings the agent could not store while the file was damaged (from the marker); added
    to ``dropped_total`` too."""
    pending: str | None = None
    """Why the salvage could not finish (the new outbox started empty, and the next start tries
    the salvage again); None when it was done."""


@dataclass(slots=True)
class _Marker:
    """What ``<name>.needs-recovery`` says: the damage found, and what a recovery must know.

    The first line is the finding; ``key=value`` lines follow: ``not_stored``, the readings the
    agent could not store while the file was damaged; ``kept`` and ``seq_floor``, the journal
    of a recovery under way (the name the damaged file is being renamed to, and the counter of
    the new outbox, below which no number may be handed out again).
    """

    reason: str
    not_stored: int = 0
    kept: str | None = None
    seq_floor: int = 0

    @classmethod
    def parse(cls, text: str) -> _Marker:
        lines = text.splitlines()
        marker = cls((lines[0].strip() if lines else "") or "(no reason given)")
        for line in lines[1:]:
            key, _, value = line.partition("=")
            value = value.strip()
            if key == "not_stored" and _DIGITS.fullmatch(value):
                marker.not_stored = int(value)
            elif key == "seq_floor" and _DIGITS.fullmatch(value):
                marker.seq_floor = min(int(value), SEQ_MAX)
            elif key == "kept" and value and "/" not in value and value not in {".", ".."}:
                marker.kept = value
        return marker

    def text(self) -> str:
        lines = [" ".join(self.reason.split())]
        if self.not_stored:
            lines.append(f"not_stored={self.not_stored}")
        if self.kept is not None:
            lines += [f"kept={self.kept}", f"seq_floor={self.seq_floor}"]
        return "\n".join(lines) + "\n"


class Outbox:
    """Readings waiting for the broker's PUBACK, bounded by rows and age.

    ``clock_synced`` says whether the wall clock is synchronised; it is used only to seed a new
    file (see the module's docstring), and False, the default, is always safe. ``recover``
    (the agent) checks an existing file and recovers it when it is damaged; a process that only
    looks at the agent's outbox (``edge-agent status``) passes False and never moves it.

    Raises:
        OutboxError: the file or its directory cannot be created, opened or written.
        OutboxCorrupt: with ``recover=False``, the file is damaged.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = 1_000_000,
        max_age_s: float = 30 * 86400,
        clock_synced: bool = False,
        recover: bool = True,
    ) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.recovery: Recovery | None = None
        """Set when this open recovered a damaged file."""
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._marker_lock = threading.Lock()
        self._closed = False
        self._floor = 0  # a new outbox starts above it (numbers a lost outbox handed out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create {path.parent}: {exc.strerror}") from None
        if recover:
            self._check_and_recover(clock_synced=clock_synced)
        with self._write() as conn:
            conn.executescript(_SCHEMA)
            _migrate(conn)
            seeded = conn.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            if seeded is None and conn.execute("SELECT 1 FROM outbox LIMIT 1").fetchone() is None:
                start, how = _seed(clock_synced=clock_synced)
                if self._floor >= start:
                    start, how = self._floor, "above the numbers of a lost outbox"
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (start,)
                )
                log.info("new outbox path=%s first_seq=%d seeded_from=%s", path, start + 1, how)
        if recover:
            if self.recovery is None:  # not right after a salvage that failed: next time
                self._retry_salvages()
            self._prune_kept()

    # -- connections and errors --------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise OutboxError(f"outbox {self.path} is closed")
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            except sqlite3.Error as exc:
                raise self._error(exc, "cannot open the outbox") from None
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as exc:
                conn.close()
                raise self._error(exc, "cannot open the outbox") from None
            conn.isolation_level = "DEFERRED"
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _error(self, exc: sqlite3.Error, doing: str = "outbox") -> OutboxError:
        """The outbox's exception for a SQLite error.

        Only SQLite's corruption codes (``SQLITE_CORRUPT``, ``SQLITE_NOTADB`` and their extended
        codes) mean a damaged file: :class:`OutboxCorrupt`, and the marker is left for the next
        start. A full disk is :class:`OutboxFull`. Anything else (busy, an I/O error, a
        constraint failure, a connection already closed by a shutdown) is an
        :class:`OutboxError` that says nothing about the file.
        """
        if _is_corruption(exc):
            error = _sqlite_text(exc)
            self._mark_damaged(error)
            return OutboxCorrupt(
                f"the outbox {self.path} is damaged: {error}; the next "
                "start keeps it aside and recovers what it can (a failing SD card is the usual "
                "cause)"
            )
        if _is_full(exc):
            return OutboxFull(f"the disk holding {self.path} is full: {exc}")
        return OutboxError(f"{doing} {self.path}: {exc}")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        with self._errors(), conn:
            yield conn

    def _close_connections(self) -> None:
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    def close(self) -> None:
        """Close every thread's connection; safe to call twice."""
        self._closed = True
        self._close_connections()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- damage: detection and recovery ------------------------------------------------------
    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _read_marker(self) -> _Marker | None:
        try:
            text = self._sibling(_MARKER_SUFFIX).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            return _Marker(f"(marker unreadable: {exc.strerror})")
        return _Marker.parse(text)

    def _write_marker(self, marker: _Marker) -> None:
        """Replace the marker, atomically and durably.

        Raises:
            OSError: it cannot be written.
        """
        tmp = self._sibling(f"{_MARKER_SUFFIX}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(marker.text())
                f.flush()
                os.fsync(f.fileno())
            _replace(tmp, self._sibling(_MARKER_SUFFIX))
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _mark_damaged(self, error: str) -> None:
        """Leave the marker that makes the next start recover the file (best effort).

        The first finding stays, with what the agent counted into it; a marker still holding the
        journal of a finished recovery (see :meth:`_install`) is replaced.
        """
        with self._marker_lock:
            marker = self._read_marker()
            if marker is not None and marker.kept is None:
                return
            with contextlib.suppress(OSError):
                self._write_marker(
                    _Marker(f"{_utc()} {error}", not_stored=marker.not_stored if marker else 0)
                )

    def note_not_stored(self, count: int) -> None:
        """Record readings the agent could not store because the file is damaged.

        The damaged file cannot take the count, so it goes into the marker, and the recovery at
        the next start adds it to ``dropped_total``.

        Raises:
            OutboxError: the marker cannot be written.
        """
        if count <= 0:
            return
        with self._marker_lock:
            marker = self._read_marker() or _Marker(f"{_utc()} damaged: readings not stored")
            marker.not_stored += count
            try:
                self._write_marker(marker)
            except OSError as exc:
                raise OutboxError(
                    f"cannot record {count} readings lost in {self._sibling(_MARKER_SUFFIX)}: "
                    f"{exc.strerror}"
                ) from None

    def _check_and_recover(self, *, clock_synced: bool) -> None:
        directory = self.path.parent
        for entry in _entries(directory):
            if entry.startswith(f"{self.path.name}{_MARKER_SUFFIX}.") and entry.endswith(".tmp"):
                with contextlib.suppress(OSError):  # a marker write a power cut interrupted
                    (directory / entry).unlink()
        marker = self._read_marker()
        if self._resume(marker):
            return
        reason: str | None
        if marker is not None:
            reason = f"the previous run found it damaged: {marker.reason}"
        else:
            reason = self._quick_check()
        if reason is not None:
            self.recovery = self._recover(reason, marker=marker, clock_synced=clock_synced)

    def _resume(self, marker: _Marker | None) -> bool:
        """Finish what a power cut left; True when the path then needs no check.

        A recovery's steps (see :meth:`_recover` and :meth:`_install`) leave one of these:

        * the damaged file still at the path, with its log, a new outbox perhaps (partly) built
          as ``.recovering``: nothing to finish, the recovery is done again (False);
        * the damaged file renamed to its kept name, its ``-wal`` and ``-shm`` perhaps still at
          the path's names, the complete new outbox waiting as ``.recovering``: the log follows
          the damaged file (a new file must never meet it), then the new outbox takes the path;
        * the new outbox at the path, the marker with the recovery's journal still there: only
          the marker goes (the new outbox is sound, and already counts what the marker says).

        A path that is simply missing (a first start) gets a new outbox; should a marker or a
        kept copy say numbers were handed out before, it starts above them.
        """
        building = self._sibling(_BUILDING_SUFFIX)
        built = _built(building)  # None: no complete new outbox; else the kept name it records
        name = built or (marker.kept if marker is not None else None)
        kept = self.path.with_name(name) if name else None
        if not self.path.exists():
            self._move_log_aside(kept)
            if built is not None:
                try:
                    _replace(building, self.path)
                except OSError as exc:
                    raise OutboxError(
                        f"cannot put the recovered outbox {building} in place: {exc.strerror}"
                    ) from None
                log.warning(
                    "outbox recovery completed after an interruption path=%s kept=%s",
                    self.path,
                    kept,
                )
            else:
                self._discard(building)
                if marker is not None or kept is not None:
                    self._floor = max(
                        marker.seq_floor if marker is not None else 0,
                        _kept_counter(kept) if kept is not None else 0,
                    )
                    log.warning(
                        "outbox missing after a damaged one path=%s: a new outbox starts above %d",
                        self.path,
                        self._floor,
                    )
            if marker is not None:
                self._finish_marker()
            return True
        if (
            marker is not None
            and marker.kept is not None
            and self.path.with_name(marker.kept).exists()
        ):
            # The renames began with the damaged file, and only the new outbox takes the path.
            self._discard(building)
            self._finish_marker()
            log.warning(
                "outbox recovery completed after an interruption path=%s kept=%s",
                self.path,
                self.path.with_name(marker.kept),
            )
            return True
        return False

    def _move_log_aside(self, kept: Path | None) -> None:
        """Move a ``-wal`` and ``-shm`` left at the path's names (the path itself missing) aside.

        They belong to the damaged file, next to which they go (``kept``), else to a kept name
        of their own: SQLite would apply an old log to a new file at the path.
        """
        logs = [s for s in ("-wal", "-shm") if Path(f"{self.path}{s}").exists()]
        if not logs:
            return
        if kept is None or any(Path(f"{kept}{s}").exists() for s in logs):
            kept = self._new_kept()
        try:
            for suffix in logs:
                _replace(Path(f"{self.path}{suffix}"), Path(f"{kept}{suffix}"))
        except OSError as exc:
            raise OutboxError(
                f"cannot move the damaged outbox's log {self.path}-wal aside: {exc.strerror}"
            ) from None
        log.warning("moved the damaged outbox's log next to it path=%s kept=%s", self.path, kept)

    def _new_kept(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = self._sibling(f".corrupt-{stamp}")
        n = 1
        while any(Path(f"{kept}{s}").exists() for s in ("", "-wal", "-shm")):
            kept = self._sibling(f".corrupt-{stamp}-{n}")
            n += 1
        return kept

    def _discard(self, building: Path) -> None:
        try:
            for stale in (building, Path(f"{building}-journal")):
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot remove {building}: {exc.strerror}") from None

    def _finish_marker(self) -> None:
        marker = self._sibling(_MARKER_SUFFIX)
        try:
            marker.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", marker, exc.strerror)
            return
        _fsync_dir(self.path.parent)

    def _quick_check(self) -> str | None:
        """None when ``PRAGMA quick_check`` finds the file sound; what it found otherwise.

        A busy or unreadable file is not a damaged one: the ordinary open reports it.
        """
        try:
            conn = _connect_readonly(self.path)
        except sqlite3.Error:
            return None
        try:
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
        except sqlite3.Error as exc:
            return _sqlite_text(exc) if _is_corruption(exc) else None
        finally:
            conn.close()
        if rows == [("ok",)]:
            return None
        found = "; ".join(str(r[0]) for r in rows).replace("\n", "; ")
        return f"quick_check: {found.removeprefix('*** in database main ***; ')}"

    def _recover(self, reason: str, *, marker: _Marker | None, clock_synced: bool) -> Recovery:
        """Keep the damaged file aside, salvage what can be read into a new outbox in its place.

        A salvage that cannot finish (a full card) still moves the damaged file aside: an empty
        outbox starts above its numbers, and the next start tries the salvage again.

        Raises:
            OutboxError: not even an empty outbox can be written, or the files cannot be
                renamed; the marker stays, so the next start tries again.
        """
        log.error("outbox damaged, recovering path=%s reason=%s", self.path, reason)
        if marker is None:
            self._mark_damaged(reason)  # a recovery cut short is done again at the next start
            marker = self._read_marker() or _Marker(reason)
        self._close_connections()
        kept = self._new_kept()
        building = self._sibling(_BUILDING_SUFFIX)
        self._discard(building)  # an earlier attempt's: made again from the damaged file
        salvage = _Salvage(self.path)
        try:
            try:
                recovery, recoveries = self._build(
                    building,
                    salvage,
                    kept=kept,
                    reason=reason,
                    marker=marker,
                    clock_synced=clock_synced,
                )
            except sqlite3.Error as exc:
                self._discard(building)
                failure = _sqlite_text(exc)
                log.error(  # noqa: TRY400 - the message is the whole story
                    "cannot salvage the damaged outbox path=%s error=%s: it is kept aside all the "
                    "same, an empty outbox starts above its numbers, and the salvage is tried "
                    "again at the next start",
                    self.path,
                    failure,
                )
                try:
                    recovery, recoveries = self._build(
                        building,
                        salvage,
                        kept=kept,
                        reason=reason,
                        marker=marker,
                        clock_synced=clock_synced,
                        failure=failure,
                    )
                except sqlite3.Error as again:
                    self._discard(building)
                    if _is_full(again):
                        raise OutboxFull(
                            f"cannot recover the damaged outbox {self.path}: the disk is full "
                            f"({again})"
                        ) from None
                    raise OutboxError(
                        f"cannot recover the damaged outbox {self.path}: {again}"
                    ) from None
        finally:
            salvage.close()
        self._install(building, kept, marker, recovery)
        if recovery.pending is not None:
            log.error(
                "outbox recovered without its readings: the damaged file is kept as %s, the "
                "salvage failed (%s) and is tried again at the next start; not_stored=%d "
                "added_to_dropped_total=%d next_seq=%d outbox_recoveries=%d",
                kept,
                recovery.pending,
                recovery.not_stored,
                recovery.not_stored,
                recovery.next_seq,
                recoveries,
            )
            return recovery
        log.error(
            "outbox recovered: the damaged file is kept as %s salvaged=%d lost=%s not_stored=%d "
            "added_to_dropped_total=%d next_seq=%d outbox_recoveries=%d%s",
            kept,
            recovery.salvaged,
            _lost_text(recovery),
            recovery.not_stored,
            recovery.dropped + recovery.not_stored,
            recovery.next_seq,
            recoveries,
            ""
            if recovery.lost is not None
            else " (the damaged pages' readings cannot be counted: dropped_total gets the "
            "lower bound, the garbled rows and one reading for each damaged stretch)",
        )
        return recovery

    def _build(
        self,
        building: Path,
        salvage: _Salvage,
        *,
        kept: Path,
        reason: str,
        marker: _Marker,
        clock_synced: bool,
        failure: str | None = None,
    ) -> tuple[Recovery, int]:
        """Write the new outbox (one transaction); return the recovery and the recoveries count.

        With a ``failure`` (the salvage could not finish) the new outbox gets no readings, only
        the meta table and a counter above the damaged file's numbers; its salvage is pending.

        Raises:
            sqlite3.Error: the new file cannot be written.
        """
        dst = sqlite3.connect(building, isolation_level=None)
        try:
            dst.execute("PRAGMA synchronous=FULL")
            dst.executescript(_SCHEMA)
            dst.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            dst.execute("BEGIN")
            if failure is None:
                insert = f"INSERT INTO outbox ({_COLUMNS}) VALUES ({_INSERT_ROW})"  # noqa: S608 - constant columns
                salvage.rows(lambda rows: dst.executemany(insert, rows))
                lost, at_least, at_most = _losses(salvage)
            else:
                lost, at_least, at_most = None, 0, None
            recovery = Recovery(
                kept=kept,
                reason=reason,
                salvaged=salvage.salvaged if failure is None else 0,
                lost=lost,
                lost_at_most=at_most if lost is None else None,
                dropped=lost if lost is not None else at_least,
                next_seq=_next_seq(salvage, floor=marker.seq_floor, clock_synced=clock_synced),
                not_stored=marker.not_stored,
                pending=failure,
            )
            meta = salvage.meta()
            recoveries = _number(meta.get("outbox_recoveries")) + 1
            meta["dropped_total"] = (
                _number(meta.get("dropped_total")) + recovery.dropped + recovery.not_stored
            )
            meta["outbox_recoveries"] = recoveries
            meta["last_outbox_recovery"] = _describe(recovery)
            meta[_RECOVERED_FROM_KEY] = kept.name
            if failure is not None:
                meta[_PENDING_KEY] = json.dumps([*_names(meta.get(_PENDING_KEY)), kept.name])
            dst.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            dst.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            dst.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)",
                (recovery.next_seq - 1,),
            )
            dst.execute("COMMIT")
        finally:
            dst.close()
        return recovery, recoveries

    def _install(self, building: Path, kept: Path, marker: _Marker, recovery: Recovery) -> None:
        """Put the new outbox in place of the damaged one, in steps a power cut cannot spoil.

        First the marker gets the journal (the kept name, the new counter), then the damaged
        file is renamed to its kept name, then its log follows it, then the new outbox takes the
        path, and last the marker goes; the directory is synced after each step. Wherever the
        power goes, the next start finds the damaged file with its log (and does it all again),
        or the complete new outbox waiting (and finishes, see :meth:`_resume`).
        """
        # The new outbox's commit deleted its -journal: make that durable before any rename, or
        # a power cut could bring the journal back and roll the new outbox back.
        _fsync_dir(self.path.parent)
        journal = dataclasses.replace(marker, kept=kept.name, seq_floor=recovery.next_seq - 1)
        try:
            self._write_marker(journal)
        except OSError as exc:
            log.warning(
                "cannot note the recovery's progress in %s (%s): a power cut in the next "
                "moments makes the next start recover the new outbox once more",
                self._sibling(_MARKER_SUFFIX),
                exc.strerror,
            )
        try:
            _replace(self.path, kept)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    _replace(Path(f"{self.path}{suffix}"), Path(f"{kept}{suffix}"))
            _replace(building, self.path)
        except OSError as exc:
            raise OutboxError(
                f"cannot move the damaged outbox {self.path} aside: {exc.strerror}"
            ) from None
        self._finish_marker()

    def _retry_salvages(self) -> None:
        """Salvage the damaged files whose salvage could not finish when they were recovered."""
        for name in _names(self.meta(_PENDING_KEY)):
            self._retry_salvage(name)

    def _retry_salvage(self, name: str) -> None:
        kept = self.path.with_name(name)
        if not kept.exists():
            log.error(
                "the damaged outbox whose salvage is pending is gone path=%s: its readings are "
                "lost, how many is unknown",
                kept,
            )
            with self._write() as conn:
                self._done_salvage(conn, name, f"{name} gone before its salvage: lost=unknown")
            return
        log.warning("salvaging the damaged outbox kept aside path=%s", kept)
        salvage = _Salvage(kept)
        insert = f"INSERT OR IGNORE INTO outbox ({_COLUMNS}) VALUES ({_INSERT_ROW})"  # noqa: S608 - constant columns
        try:
            with self._write() as conn:
                salvage.rows(lambda rows: conn.executemany(insert, rows))
                lost, at_least, at_most = _losses(salvage)
                counter, _ = _lowest_counter(salvage)
                conn.execute(  # never below a number the damaged file handed out
                    "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'outbox'",
                    (counter,),
                )
                dropped = lost if lost is not None else at_least
                _bump(conn, "dropped_total", dropped)
                lost_text = _lost_text_of(lost, at_least, at_most)
                self._done_salvage(
                    conn,
                    name,
                    f"salvage of {name} done: salvaged={salvage.salvaged} lost={lost_text}",
                )
        except OutboxError as exc:
            log.error(  # noqa: TRY400 - the message is the whole story
                "the salvage of the damaged outbox failed again path=%s error=%s: it is tried "
                "again at the next start",
                kept,
                exc,
            )
            return
        finally:
            salvage.close()
        log.error(
            "outbox salvage completed path=%s salvaged=%d lost=%s added_to_dropped_total=%d",
            kept,
            salvage.salvaged,
            lost_text,
            dropped,
        )

    @staticmethod
    def _done_salvage(conn: sqlite3.Connection, name: str, what: str) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_PENDING_KEY,)).fetchone()
        left = [n for n in _names(row[0] if row else None) if n != name]
        if left:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = ?", (json.dumps(left), _PENDING_KEY)
            )
        else:
            conn.execute("DELETE FROM meta WHERE key = ?", (_PENDING_KEY,))
        row = conn.execute("SELECT value FROM meta WHERE key = 'last_outbox_recovery'").fetchone()
        before = row[0] if row and isinstance(row[0], str) else ""
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('last_outbox_recovery', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (f"{_utc()}: {what}; earlier: {before}" if before else f"{_utc()}: {what}",),
        )

    def _prune_kept(self) -> None:
        """Keep the newest :data:`KEEP_DAMAGED` damaged copies (and those still to salvage)."""
        protect = set(_names(self.meta(_PENDING_KEY)))
        prefix = self.path.name
        groups: dict[str, tuple[str, int]] = {}
        for entry in _entries(self.path.parent):
            if not entry.startswith(prefix):
                continue
            match = _KEPT_SUFFIX.fullmatch(entry[len(prefix) :])
            if match is not None:
                groups[prefix + match[1]] = (match[2], int(match[3] or 0))
        newest = sorted(groups, key=groups.__getitem__, reverse=True)
        for base in newest[KEEP_DAMAGED:]:
            if base in protect:
                continue
            try:
                for suffix in ("", "-wal", "-shm"):
                    self.path.with_name(base + suffix).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot delete an old damaged outbox path=%s: %s", base, exc.strerror)
                continue
            log.warning(
                "deleted an old copy of a damaged outbox (only the newest %d are kept) path=%s",
                KEEP_DAMAGED,
                self.path.with_name(base),
            )

    # -- writing readings ------------------------------------------------------------------
    def add(
        self,
        *,
        sensor: str,
        kind: str,
        temperature_c: float,
        humidity_pct: float | None,
        wall: float,
        boot_id: str,
        boottime: float,
        synced: bool,
        pressure_hpa: float | None = None,
    ) -> int:
        """Store one reading; return its sequence number.

        Raises:
            OutboxFull: the disk is full (the reading is lost; the caller counts it).
            OutboxCorrupt: the file is damaged.
            OutboxError: the file cannot be written.
        """
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO outbox (sensor, kind, ts, wall, boot_id, boottime, temperature_c,"
                " humidity_pct, pressure_hpa) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sensor,
                    kind,
                    wall if synced else None,
                    wall,
                    boot_id,
                    boottime,
                    temperature_c,
                    humidity_pct,
                    pressure_hpa,
                ),
            )
            return int(cur.lastrowid or 0)

    def enforce_bounds(
        self, now_wall: float, *, synced: bool, boot_id: str, boottime: float
    ) -> tuple[int, int]:
        """Drop readings older than ``max_age_s``, then the oldest beyond ``max_rows``.

        Ages are real ages (see the module's docstring): by CLOCK_BOOTTIME (``boottime`` now)
        within this boot (``boot_id``); by ``now_wall - ts`` for an earlier boot's readings
        with a certain time, and only when the clock is ``synced``; never for an earlier boot's
        readings of uncertain time. Returns (too old, beyond max_rows) dropped now; the running
        total is kept in the file (``dropped_total``).

        Raises:
            OutboxCorrupt: the file is damaged.
            OutboxError: the file cannot be written (a full disk).
        """
        with self._write() as conn:
            too_old = conn.execute(  # one pass over the table
                "DELETE FROM outbox WHERE (boot_id = ? AND ? - boottime > ?)"
                " OR (? AND boot_id != ? AND uncertain = 0 AND ts IS NOT NULL AND ts < ?)",
                (boot_id, boottime, self.max_age_s, synced, boot_id, now_wall - self.max_age_s),
            ).rowcount
            beyond = 0
            count = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
            if count > self.max_rows:
                beyond = conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                    (count - self.max_rows,),
                ).rowcount
            if too_old + beyond:
                _bump(conn, "dropped_total", too_old + beyond)
        return too_old, beyond

    def resolve_held(
        self, *, synced: bool, now_wall: float, boot_id: str, boottime: float, hold_max_s: float
    ) -> tuple[int, int]:
        """Give held readings a time: (corrected, flagged).

        With the clock synchronised, a reading of this boot gets ``now - (boottime_now -
        boottime_then)``. A reading of an earlier boot cannot be corrected (CLOCK_BOOTTIME
        restarted), and one held longer than ``hold_max_s`` has waited enough: both are
        released with their wall time, flagged ``time_uncertain``.
        """
        corrected = flagged = 0
        with self._write() as conn:
            if synced:
                corrected = conn.execute(
                    "UPDATE outbox SET ts = ? - (? - boottime) WHERE ts IS NULL AND boot_id = ?",
                    (now_wall, boottime, boot_id),
                ).rowcount
            flagged = conn.execute(
                "UPDATE outbox SET ts = wall, uncertain = 1 WHERE ts IS NULL"
                " AND (boot_id != ? OR ? - boottime > ?)",
                (boot_id, boottime, hold_max_s),
            ).rowcount
        return corrected, flagged

    # -- sending ---------------------------------------------------------------------------
    def pending(self, after_seq: int, limit: int) -> list[Pending]:
        """Up to ``limit`` sendable readings with seq > ``after_seq``, oldest first."""
        with self._errors():
            rows = self._conn().execute(
                "SELECT seq, sensor, kind, ts, uncertain, temperature_c, humidity_pct,"
                " pressure_hpa FROM outbox WHERE seq > ? AND ts IS NOT NULL ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
            return [Pending(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7]) for r in rows]

    def delete(self, seqs: Iterable[int], *, now_wall: float | None = None) -> int:
        """Remove acknowledged readings (one transaction); record the time of the last PUBACK."""
        batch = [(s,) for s in seqs]
        if not batch:
            return 0
        try:
            self._delete(batch, now_wall)
        except OutboxFull:
            # Even a delete needs room in the write-ahead log: fold the log back into the
            # database (which frees its file) and try once more.
            with contextlib.suppress(sqlite3.Error):
                self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._delete(batch, now_wall)
        return len(batch)

    def _delete(self, batch: list[tuple[int]], now_wall: float | None) -> None:
        with self._write() as conn:
            conn.executemany("DELETE FROM outbox WHERE seq = ?", batch)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('last_puback_at', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (now_wall if now_wall is not None else time.time(),),
            )

    def discard(self, seq: int) -> None:
        """Delete one reading that can never be sent, and count it in ``dropped_total``, in one
        transaction (unlike :meth:`delete`, this is no PUBACK: ``last_puback_at`` stays)."""
        with self._write() as conn:
            if conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount:
                _bump(conn, "dropped_total", 1)

    def count_dropped(self, count: int) -> None:
        """Add readings lost outside the outbox (a full disk) to the persisted total."""
        if count:
            with self._write() as conn:
                _bump(conn, "dropped_total", count)

    def count_puback_timeout(self, outstanding: int, *, now_wall: float | None = None) -> None:
        """Record one session ended because the broker withheld PUBACKs past the timeout.

        Kept in the file, like ``dropped_total``, so ``edge-agent status`` (another process)
        can show it and it survives restarts: ``puback_timeouts`` counts the episodes,
        ``puback_timeout_publishes`` the publishes that were waiting then (each was sent again,
        none was lost), ``last_puback_timeout_at`` is the wall-clock time of the last one.

        Raises:
            OutboxError: the file cannot be written (a full disk); the caller keeps the count
                and tries again.
        """
        with self._write() as conn:
            _bump(conn, "puback_timeouts", 1)
            _bump(conn, "puback_timeout_publishes", outstanding)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('last_puback_timeout_at', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (now_wall if now_wall is not None else time.time(),),
            )

    def puback_timeouts(self) -> tuple[int, int]:
        """(sessions ended for withheld PUBACKs, publishes left unacknowledged in them)."""
        counts = []
        for key in ("puback_timeouts", "puback_timeout_publishes"):
            value = self.meta(key)
            counts.append(int(value) if isinstance(value, int | float) else 0)
        return counts[0], counts[1]

    def recoveries(self) -> tuple[int, str | None]:
        """(damaged files this outbox was recovered from, a description of the last recovery)."""
        count = self.meta("outbox_recoveries")
        last = self.meta("last_outbox_recovery")
        return (
            int(count) if isinstance(count, int | float) else 0,
            last if isinstance(last, str) else None,
        )

    # -- the node's MQTT identity ------------------------------------------------------------
    def client_token(self) -> str:
        """The secret half of the node's MQTT client id: 128 random bits, made once, kept here.

        RabbitMQ closes a connection when another one arrives with the same client id, whatever
        its user, and publishes the closed one's Last Will. A client id another node could
        guess (its node id) would let any node knock this one off the broker; a client id with
        this token in it cannot be guessed, and it is kept in the outbox, which only the agent's
        user can read, so it never travels anywhere but to the broker.

        The token stays the same across restarts and power cuts, so a new connection of this
        node replaces a half-open one of its own at once. A new outbox (a new SD card) gets a
        new token, and nothing is lost by that: the agent's MQTT session is clean, the outbox
        (not the broker) keeps what is unacknowledged. A stored value that is not 32 lowercase
        hex digits (a file edited by hand) is replaced by a new token.

        Raises:
            OutboxError: the token cannot be stored (a full disk at the very first start).
        """
        stored = self.meta(_CLIENT_TOKEN_KEY)
        if isinstance(stored, str) and _CLIENT_TOKEN.fullmatch(stored):
            return stored
        token = secrets.token_hex(CLIENT_TOKEN_BYTES)
        self.set_meta(_CLIENT_TOKEN_KEY, token)
        return token

    # -- status ----------------------------------------------------------------------------
    def depth(self) -> int:
        with self._errors():
            return int(self._conn().execute("SELECT count(*) FROM outbox").fetchone()[0])

    def held(self) -> int:
        with self._errors():
            return int(
                self._conn().execute("SELECT count(*) FROM outbox WHERE ts IS NULL").fetchone()[0]
            )

    def meta(self, key: str) -> object:
        with self._errors():
            row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: object) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def dropped_total(self) -> int:
        value = self.meta("dropped_total")
        return int(value) if isinstance(value, int | float) else 0

    def oldest_ts(self) -> float | None:
        with self._errors():
            row = self._conn().execute("SELECT min(wall) FROM outbox").fetchone()
        return None if row is None or row[0] is None else float(row[0])


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file of an older schema version to :data:`SCHEMA_VERSION`.

    Version 1 to 2: ``pressure_hpa`` (NULL in the readings already stored). Another process
    opening the same file at the same moment may have added it first: that is no error.

    Raises:
        sqlite3.Error: the file cannot be read or written.
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version >= SCHEMA_VERSION:
        return
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if PRESSURE.field not in columns:
        try:
            conn.execute(f"ALTER TABLE outbox ADD COLUMN {PRESSURE.field} REAL")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise
        log.info("outbox migrated to schema version %d: added %s", SCHEMA_VERSION, PRESSURE.field)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _bump(conn: sqlite3.Connection, key: str, by: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
        (key, by),
    )


def _sqlite_text(exc: sqlite3.Error) -> str:
    """SQLite's message and error name: ``database disk image is malformed (SQLITE_CORRUPT)``."""
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)


def _is_corruption(exc: sqlite3.Error) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB, or one of their extended codes: a damaged file."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_FULL
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _names(value: object) -> list[str]:
    """The kept names in a ``salvage_pending`` value (a JSON list); [] for anything else."""
    try:
        names = json.loads(value) if isinstance(value, str) else []
    except ValueError:
        return []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in {".", ".."}]


def _entries(directory: Path) -> list[str]:
    try:
        return [entry.name for entry in directory.iterdir()]
    except OSError:
        return []


def _built(building: Path) -> str | None:
    """The kept name a complete new outbox records ("" if none); None: not a complete one.

    The new outbox is written in one transaction with a rollback journal: while its
    ``-journal`` exists, the transaction did not commit.
    """
    if not building.exists() or Path(f"{building}-journal").exists():
        return None
    try:
        # immutable: read the file as it is, and create nothing next to it
        conn = sqlite3.connect(f"{building.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return None
    try:
        if conn.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'outbox'").fetchone() is None:
            return None
        row = conn.execute(
            "SELECT value FROM meta WHERE key = ?", (_RECOVERED_FROM_KEY,)
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    value = row[0] if row else None
    return value if isinstance(value, str) and "/" not in value else ""


def _kept_counter(kept: Path) -> int:
    """The lowest counter safe after the damaged file ``kept`` (0 when it tells nothing)."""
    if not kept.exists():
        return 0
    salvage = _Salvage(kept)
    try:
        return _lowest_counter(salvage)[0]
    finally:
        salvage.close()


def _seed(*, clock_synced: bool) -> tuple[int, str]:
    """Where a new outbox starts counting, and what from (see the module's docstring)."""
    if clock_synced:
        return int(time.time() * 1_000_000), "the synchronised clock (microseconds)"
    low, high = RANDOM_SEED_RANGE
    return low + secrets.randbelow(high - low), "random (clock not synchronised)"


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes the file: no checkpoint on close, nothing rewritten."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _replace(source: Path, target: Path) -> None:
    """Rename ``source`` over ``target`` and make the rename durable (fsync the directory)."""
    source.replace(target)
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the renames and removals in ``directory`` durable (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _number(value: object) -> int:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0


Row = tuple[object, ...]
_YEAR_2000: Final = 946_684_800.0
_YEAR_2100: Final = 4_102_444_800.0
_CENTURY_S: Final = 100 * 365.25 * 86400


def _within(value: object, low: float, high: float) -> bool:
    """A number (SQLite hands out int or float; never NaN) in ``[low, high]``."""
    return (type(value) is float or type(value) is int) and low <= value <= high


class _Plausible:
    """Tells rows the outbox wrote from garbage read off a damaged page.

    The checks are those a stored reading passes whatever its sensor: ids as the wire format
    takes them, times between 1970 and 2100 (a synchronised time after 2000), temperature and
    humidity within the wire format's widest ranges. A cell cut in the middle by the damage
    can still pass them with a wrong value; whole damaged pages (what a failing card does)
    never get here, SQLite refuses them. A million rows take about a second: the few
    distinct ids are checked once each.
    """

    def __init__(self) -> None:
        self._ids: dict[object, bool] = {}
        self._boots: dict[object, bool] = {}

    def _id(self, value: object) -> bool:
        ok = self._ids.get(value)
        if ok is None:
            ok = self._ids[value] = isinstance(value, str) and bool(_ID.fullmatch(value))
        return ok

    def _boot(self, value: object) -> bool:
        ok = self._boots.get(value)
        if ok is None:
            ok = self._boots[value] = isinstance(value, str) and 0 < len(value) <= 128
        return ok

    def __call__(self, raw: Row) -> bool:
        if len(raw) != 11:
            return False
        (seq, sensor, kind, ts, wall, boot_id, boottime, uncertain, temperature_c, humidity,
         pressure) = raw  # fmt: skip
        return (
            type(seq) is int
            and 0 < seq <= SEQ_MAX
            and self._id(sensor)
            and self._id(kind)
            and self._boot(boot_id)
            and (uncertain == 0 or uncertain == 1)  # noqa: PLR1714 - also rejects 0.5, "1"
            and type(uncertain) is int
            and _within(wall, 0, _YEAR_2100)
            and (ts is None or _within(ts, _YEAR_2000 if uncertain == 0 else 0, _YEAR_2100))
            and _within(boottime, 0, _CENTURY_S)
            and _within(temperature_c, TEMPERATURE.low, TEMPERATURE.high)
            and (humidity is None or _within(humidity, HUMIDITY.low, HUMIDITY.high))
            and (pressure is None or _within(pressure, PRESSURE.low, PRESSURE.high))
        )


def _as_seq(value: object) -> int | None:
    return value if isinstance(value, int) and 0 <= value <= SEQ_MAX else None


class _Salvage:
    """Reads what can still be read from a damaged outbox, never writing to it.

    Rows are read in sequence order in chunks. Where a read fails (a damaged page), the search
    for the next readable sequence number jumps ahead in growing steps, then narrows down (each
    probe is one seek through the table's tree, which skips the damaged leaf), so the readings
    on the pages around a damaged one are saved too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.salvaged = 0
        self.garbled = 0  # rows read but not plausible: lost, and known to be
        self.highest = 0
        self.skipped: list[tuple[int, int | None]] = []  # seq ranges skipped, None: to the end
        self._select: str | None = None
        self._conn: sqlite3.Connection | None
        try:
            self._conn = _connect_readonly(path)
        except sqlite3.Error as exc:
            log.warning("cannot read the damaged outbox at all path=%s error=%s", path, exc)
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[object, ...] | None:
        """The first row, () when there is none, None when the read fails."""
        if self._conn is None:
            return None
        try:
            row = self._conn.execute(sql, params).fetchone()
        except sqlite3.Error:
            return None
        return () if row is None else tuple(row)

    def counter(self) -> int | None:
        """The damaged file's AUTOINCREMENT counter: the highest number it ever handed out."""
        row = self._one("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
        return _as_seq(row[0]) if row else None

    def top(self) -> int | None:
        row = self._one("SELECT max(seq) FROM outbox")
        return _as_seq(row[0]) if row else None

    def count(self) -> int | None:
        row = self._one("SELECT count(*) FROM outbox")
        return _as_seq(row[0]) if row else None

    def meta(self) -> dict[str, object]:
        """Every meta entry that can be read (all at once, else key by key)."""
        raw: list[tuple[object, object]] = []
        if self._conn is not None:
            try:
                raw = [(r[0], r[1]) for r in self._conn.execute("SELECT key, value FROM meta")]
            except sqlite3.Error:
                raw = []
                for wanted in _META_KEYS:
                    row = self._one("SELECT value FROM meta WHERE key = ?", (wanted,))
                    if row:
                        raw.append((wanted, row[0]))
        return {
            key: value
            for key, value in raw
            if isinstance(key, str) and (value is None or isinstance(value, str | int | float))
        }

    def rows(self, sink: Callable[[list[Row]], object]) -> None:
        """Hand every readable, plausible row to ``sink``, in chunks, in sequence order."""
        if self._conn is None:
            self.skipped.append((1, None))
            return
        plausible = _Plausible()
        after = 0
        while after < SEQ_MAX:
            chunk, last, failed = self._fetch(after)
            good = [row for row in chunk if plausible(row)]
            self.garbled += len(chunk) - len(good)
            if good:
                sink(good)
                self.salvaged += len(good)
                self.highest = max(self.highest, _as_seq(good[-1][0]) or 0)  # ascending
            if not failed:
                if len(chunk) < _SALVAGE_CHUNK:
                    return
                after = last
                continue
            found = self._next_readable(last)
            if found is None:
                self.skipped.append((last + 1, None))
                return
            if found <= last + 1:
                found = last + 2  # readable to a seek, not to a read: skip that row
            self.skipped.append((last + 1, found - 1))
            after = found - 1

    def _fetch(self, after: int) -> tuple[list[Row], int, bool]:
        """(rows with seq > ``after`` read before a failure, the last seq read, failed)."""
        assert self._conn is not None  # noqa: S101 - rows() checked it
        rows: list[Row] = []
        last = after
        try:
            cursor = self._conn.execute(
                f"SELECT {self._columns()} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608 - constant columns
                (after, _SALVAGE_CHUNK),
            )
            for row in cursor:
                seq = row[0]
                if type(seq) is not int or seq <= last:  # a garbled page's order: stop here
                    return rows, last, True
                rows.append(row)
                last = seq
        except sqlite3.Error:  # a damaged page, or text that is not UTF-8
            return rows, last, True
        return rows, last, False

    def _columns(self) -> str:
        """What to select: a file of schema version 1 has no ``pressure_hpa`` (NULL for it)."""
        if self._select is None:
            assert self._conn is not None  # noqa: S101 - rows() checked it
            try:
                names = {row[1] for row in self._conn.execute("PRAGMA table_info(outbox)")}
            except sqlite3.Error:
                names = set()  # the schema cannot be read: the select fails as damage does
            self._select = _COLUMNS_V1 if names and PRESSURE.field not in names else _COLUMNS
        return self._select

    def _first_from(self, start: int) -> tuple[object, ...] | None:
        return self._one("SELECT seq FROM outbox WHERE seq >= ? ORDER BY seq LIMIT 1", (start,))

    def _next_readable(self, after: int) -> int | None:
        """The first sequence number above ``after`` a seek can read; None if none is left."""
        gap = 1
        while self._first_from(after + gap) is None:
            gap *= 2
            if after + gap > SEQ_MAX:
                return None
        low, high = after + gap // 2, after + gap
        while high - low > 1:
            middle = (low + high) // 2
            if self._first_from(middle) is None:
                low = middle
            else:
                high = middle
        row = self._first_from(high)
        return _as_seq(row[0]) if row else None


def _losses(salvage: _Salvage) -> tuple[int | None, int, int | None]:
    """(lost, at least lost, at most lost) of a salvage done; lost is None when unknown.

    The damaged file counts its rows unless a leaf page is damaged (``count(*)`` reads every
    leaf's header); then only bounds are known. At most: the garbled rows plus every sequence
    number in the stretches skipped (up to the counter), since any of them may have been there.
    At least: the garbled rows plus one reading for each skipped stretch that readable rows
    show to lie inside the table (a page of the table's tree that cannot be read holds at
    least one row; an empty table's unreadable root holds none, so a file nothing could be
    read from counts nothing). The gaps' sizes are not counted as lost: readings are
    acknowledged (deleted) in about the order of their numbers but not exactly (held readings
    stay, the age limit works per boot), so a gap may well be readings already delivered.
    """
    total = salvage.count()
    lost = None if total is None else max(0, total - salvage.salvaged)
    counter = salvage.counter()
    cap = counter if counter is not None else salvage.top()
    read_any = salvage.salvaged + salvage.garbled > 0
    at_least = salvage.garbled
    at_most: int | None = salvage.garbled
    for low, high in salvage.skipped:
        end = high if high is not None else cap
        if end is not None and end < low:
            continue  # nothing above the counter: this stretch held nothing
        if high is not None or read_any:
            at_least += 1
        at_most = None if end is None or at_most is None else at_most + end - low + 1
    if at_most is not None:
        at_least = min(at_least, at_most)
    return lost, at_least, at_most


def _lowest_counter(salvage: _Salvage) -> tuple[int, bool]:
    """The counter an outbox after this damaged file needs at least, and whether it is exact.

    Exact: the damaged file's own counter (and never below a row seen). Lost counter: numbers
    above the highest one seen may have been sent (and deleted) already, so 2**32 above it
    (less only within 2**32 of the wire format's maximum, never below what was seen).
    Nothing seen: 0.
    """
    counter = salvage.counter()
    seen = max(salvage.highest, salvage.top() or 0)
    if counter is not None:
        return max(counter, seen), True
    if not seen:
        return 0, False
    return max(seen, min(seen + _UNKNOWN_COUNTER_MARGIN, SEQ_MAX - _UNKNOWN_COUNTER_MARGIN)), False


def _next_seq(salvage: _Salvage, *, floor: int, clock_synced: bool) -> int:
    """Where the new outbox starts: above the damaged file's numbers and ``floor``.

    With the counter lost, a new seed too if it is higher (a file nothing could be read from
    gets a new seed).
    """
    lowest, exact = _lowest_counter(salvage)
    if not exact:
        lowest = max(lowest, _seed(clock_synced=clock_synced)[0])
    return min(max(lowest, floor), SEQ_MAX) + 1


def _lost_text_of(lost: int | None, at_least: int, at_most: int | None) -> str:
    if lost is not None:
        return str(lost)
    if at_most is not None:
        return f"unknown (at least {at_least}, at most {at_most})"
    return f"unknown (at least {at_least})"


def _lost_text(recovery: Recovery) -> str:
    if recovery.pending is not None:
        return "unknown (salvage pending)"
    return _lost_text_of(recovery.lost, recovery.dropped, recovery.lost_at_most)


def _describe(recovery: Recovery) -> str:
    if recovery.pending is not None:
        done = (
            f"salvage failed ({recovery.pending}): the outbox started empty above its numbers, "
            "the salvage is tried again at the next start;"
        )
    else:
        done = f"salvaged={recovery.salvaged} lost={_lost_text(recovery)}"
    not_stored = f" not_stored={recovery.not_stored}" if recovery.not_stored else ""
    return (
        f"{_utc()}: damaged file kept as {recovery.kept.name}; {done}{not_stored} "
        f"next_seq={recovery.next_seq}; {recovery.reason}"
    )
