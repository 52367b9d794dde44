"""The durable outbox: every reading is in SQLite before it is sent, and leaves only on PUBACK.

SQLite in WAL mode with ``synchronous=FULL``: a committed reading survives a power cut. The
row id is the node's sequence number. ``AUTOINCREMENT`` never hands out an id twice, even after
the rows are deleted, and a new outbox starts counting at its creation time in microseconds,
so a fresh SD card does not reuse the numbers of the old one (the pipeline would take them
for duplicates).

The outbox also keeps the secret half of the node's MQTT client id (:meth:`Outbox.client_token`):
it belongs to this node's durable state, and no other node can read it.

A reading taken while the clock was not synchronised is stored with ``ts`` NULL: it is held
until :meth:`Outbox.resolve_held` corrects its time from CLOCK_BOOTTIME (same boot) or, past
the hold limit or after a reboot, releases it flagged as ``time_uncertain``.

Each thread gets its own connection; SQLite serialises the writers.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from edge_agent.errors import EdgeError

__all__ = ["CLIENT_TOKEN_BYTES", "Outbox", "OutboxError", "OutboxFull", "Pending"]

CLIENT_TOKEN_BYTES: Final = 16
"""Random bytes in a client-id token: 128 bits, written as 32 lowercase hex digits."""
_CLIENT_TOKEN: Final = re.compile(r"[0-9a-f]{32}")
_CLIENT_TOKEN_KEY: Final = "mqtt_client_token"  # noqa: S105 - a meta key, not a secret

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
    humidity_pct   REAL
);
CREATE INDEX IF NOT EXISTS outbox_held ON outbox (seq) WHERE ts IS NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


class OutboxError(EdgeError, OSError):
    """The outbox file cannot be opened or written."""


class OutboxFull(OutboxError):  # noqa: N818 - reads as the state it reports
    """The disk holding the outbox is full; the reading was not stored."""


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


class Outbox:
    """Readings waiting for the broker's PUBACK, bounded by rows and age."""

    def __init__(self, path: Path, *, max_rows: int = 1_000_000, max_age_s: float = 30 * 86400):
        self.path = path
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create {path.parent}: {exc.strerror}") from None
        conn = self._conn()
        with conn:
            conn.executescript(_SCHEMA)
            seeded = conn.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            if seeded is None and conn.execute("SELECT 1 FROM outbox LIMIT 1").fetchone() is None:
                start = int(time.time() * 1_000_000)
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (start,)
                )

    # -- connections -----------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise OutboxError(f"outbox {self.path} is closed")
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None
            conn.isolation_level = "DEFERRED"
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            with conn:
                yield conn
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise OutboxFull(f"the disk holding {self.path} is full: {exc}") from None
            raise OutboxError(f"outbox {self.path}: {exc}") from None

    def close(self) -> None:
        """Close every thread's connection; safe to call twice."""
        self._closed = True
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
    ) -> int:
        """Store one reading; return its sequence number.

        Raises:
            OutboxFull: the disk is full (the reading is lost; the caller counts it).
            OutboxError: the file cannot be written.
        """
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO outbox (sensor, kind, ts, wall, boot_id, boottime, temperature_c,"
                " humidity_pct) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sensor,
                    kind,
                    wall if synced else None,
                    wall,
                    boot_id,
                    boottime,
                    temperature_c,
                    humidity_pct,
                ),
            )
            return int(cur.lastrowid or 0)

    def enforce_bounds(self, now_wall: float) -> int:
        """Drop the oldest rows beyond ``max_rows`` and rows older than ``max_age_s``.

        Returns how many were dropped now; the running total is kept in the file.
        """
        with self._write() as conn:
            dropped = conn.execute(
                "DELETE FROM outbox WHERE wall < ? AND ts IS NOT NULL",
                (now_wall - self.max_age_s,),
            ).rowcount
            count = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
            if count > self.max_rows:
                dropped += conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                    (count - self.max_rows,),
                ).rowcount
            if dropped:
                _bump(conn, "dropped_total", dropped)
        return dropped

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
        rows = self._conn().execute(
            "SELECT seq, sensor, kind, ts, uncertain, temperature_c, humidity_pct FROM outbox"
            " WHERE seq > ? AND ts IS NOT NULL ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [Pending(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) for r in rows]

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
        return int(self._conn().execute("SELECT count(*) FROM outbox").fetchone()[0])

    def held(self) -> int:
        return int(
            self._conn().execute("SELECT count(*) FROM outbox WHERE ts IS NULL").fetchone()[0]
        )

    def meta(self, key: str) -> object:
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
        row = self._conn().execute("SELECT min(wall) FROM outbox").fetchone()
        return None if row is None or row[0] is None else float(row[0])


def _bump(conn: sqlite3.Connection, key: str, by: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
        (key, by),
    )
