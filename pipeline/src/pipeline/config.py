"""The consumer's settings, read once from the environment and checked at start."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from pipeline.db import DatabaseTimeouts
from pipeline.errors import ConfigError
from pipeline.origin import derive_key

__all__ = [
    "ConsumerSettings",
    "check_rabbitmq_urls",
    "has_password",
    "parse_rabbitmq_urls",
    "redact",
]

_DEFAULT_RABBITMQ_URL = "amqp://localhost:5672/%2F"
# RABBITMQ_URL lists the nodes of one cluster; more than this is a mistake, not a cluster.
MAX_RABBITMQ_URLS: Final = 16
_AMQP_SCHEMES: Final = ("amqp://", "amqps://")
_DEFAULT_PORTS: Final = {"amqp": 5672, "amqps": 5671}
# Where RABBITMQ_URL's list splits: at a comma that the next URL's scheme follows. A comma
# anywhere else stays in its URL: a password may hold one (one URL was all there used to be).
_URL_SEPARATOR: Final = re.compile(r"\s*,\s*(?=amqps?://)")
# A comma before another scheme: a list whose next URL is not amqp:// or amqps://.
_OTHER_SCHEME: Final = re.compile(r",\s*[A-Za-z][A-Za-z0-9+.-]*://")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def _with_credentials(url: str, user: str | None, password: str | None) -> str:
    """Put RABBITMQ_USER / RABBITMQ_PASSWORD into the URL, escaped, if they are given."""
    if not user and not password:
        return url
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    userinfo = quote(user or parts.username or "", safe="")
    if password:
        userinfo += ":" + quote(password, safe="")
    return urlunsplit((parts.scheme, f"{userinfo}@{netloc}", parts.path, parts.query, ""))


def parse_rabbitmq_urls(raw: str, user: str | None, password: str | None) -> tuple[str, ...]:
    """RABBITMQ_URL's URLs (one, or a comma-separated list), with RABBITMQ_USER / _PASSWORD in each.

    Raises:
        ConfigError: naming RABBITMQ_URL, the entry's position and its value (passwords
            redacted); see :func:`check_rabbitmq_urls`.
    """
    entries = [entry.strip() for entry in _URL_SEPARATOR.split(raw.strip())]
    if len(entries) > MAX_RABBITMQ_URLS:
        raise ConfigError(_too_many(len(entries)))
    for position, entry in enumerate(entries, 1):
        problem = _syntax_problem(entry)
        if problem is not None:
            raise ConfigError(f"{_entry(position, len(entries), entry)} {problem}")
    return check_rabbitmq_urls([_with_credentials(entry, user, password) for entry in entries])


def check_rabbitmq_urls(urls: Sequence[str]) -> tuple[str, ...]:
    """The URLs, checked: each one usable by pika, and together the nodes of one cluster.

    One cluster means one vhost and one set of users: every URL names the same vhost and
    carries the same user and password (so the dead-letter key derived from the password is
    the same whatever the order), and no node is listed twice (the same host and port,
    however spelled). At most :data:`MAX_RABBITMQ_URLS`.

    Raises:
        ConfigError: naming RABBITMQ_URL, the entry's position and its value, passwords
            redacted.
    """
    count = len(urls)
    if count == 0:
        raise ConfigError(f"RABBITMQ_URL is not set: {_DEFAULT_RABBITMQ_URL}, or a list of them")
    if count > MAX_RABBITMQ_URLS:
        raise ConfigError(_too_many(count))
    first: tuple[str, tuple[str | None, str | None]] | None = None
    seen: dict[tuple[str, int], int] = {}
    for position, url in enumerate(urls, 1):
        name = _entry(position, count, url)
        problem = _syntax_problem(url) or _pika_problem(url)
        if problem is not None:
            raise ConfigError(f"{name} {problem}")
        parts = urlsplit(url)
        vhost = _vhost(parts.path)
        credentials = (
            None if parts.username is None else unquote(parts.username),
            None if parts.password is None else unquote(parts.password),
        )
        if first is None:
            first = (vhost, credentials)
        elif vhost != first[0]:
            raise ConfigError(
                f"{name} names the vhost {vhost!r}, entry 1 names {first[0]!r}: the URLs are "
                "the nodes of one cluster and must all name the same vhost"
            )
        elif credentials != first[1]:
            raise ConfigError(
                f"{name} has another user or password than entry 1: the nodes of one cluster "
                "share their users; give the same credentials in every URL, or give them once "
                "in RABBITMQ_USER and RABBITMQ_PASSWORD"
            )
        node = (
            (parts.hostname or "localhost").lower(),
            parts.port or _DEFAULT_PORTS[parts.scheme],
        )
        if node in seen:
            raise ConfigError(
                f"{name} is the node {node[0]}:{node[1]} again (entry {seen[node]}): "
                "list each node once"
            )
        seen[node] = position
    return tuple(urls)


def _too_many(count: int) -> str:
    return (
        f"RABBITMQ_URL lists {count} URLs: at most {MAX_RABBITMQ_URLS}, one for each node of "
        "the cluster"
    )


def _entry(position: int, count: int, url: str) -> str:
    """How an error names an entry of RABBITMQ_URL: position and value, password redacted."""
    # Without a scheme redact() cannot tell where a password ends: none of it is shown.
    shown = "***" + url[url.rfind("@") :] if "://" not in url and "@" in url else redact(url)
    if count == 1:
        return f"RABBITMQ_URL={shown!r}"
    return f"RABBITMQ_URL entry {position} of {count} ({shown!r})"


def _syntax_problem(url: str) -> str | None:
    """What is wrong with one AMQP URL's form, or None; never shows the URL itself."""
    if not url:
        return "is empty"
    if not url.startswith(_AMQP_SCHEMES):
        return "must start with amqp:// or amqps://"
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced [ or ] around the host
        return "is not a URL: amqp://host:port/vhost (an IPv6 address in [ ])"
    return _parts_problem(url, parts)


def _parts_problem(url: str, parts: SplitResult) -> str | None:
    """What is wrong with the parts of an AMQP URL, or None."""
    if _OTHER_SCHEME.search(url):
        if _URL_SEPARATOR.search(url):  # only from code: RABBITMQ_URL is split there
            return "holds more than one URL: give them one by one in rabbitmq_urls"
        return "lists a URL that does not start with amqp:// or amqps://"
    span = _userinfo_end(url)
    if span is not None and parts.password != url[span[0] : span[1]]:
        # A '/', '?' or '#' in the password ends the host part early: the rest of the
        # password would be taken for the host, the port or the vhost.
        return (
            "cannot be read as user:password@host:port/vhost: percent-escape a '/', '?' or "
            "'#' in the password (%2F, %3F, %23) and an '@' in the vhost (%40), or give the "
            "password in RABBITMQ_PASSWORD"
        )
    if "," in parts.netloc.rpartition("@")[2] + parts.path + parts.query + parts.fragment:
        return (
            "holds a comma outside its password: separate the URLs with commas, each one "
            "starting with amqp:// or amqps://"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    return "has a port that is not a number in 1..65535" if port == 0 else None


def _pika_problem(url: str) -> str | None:
    """What pika refuses in the URL (its query parameters), or None."""
    from pipeline.brokers import url_parameters  # noqa: PLC0415 - pika only where needed

    try:
        url_parameters(url)
    except Exception as exc:  # noqa: BLE001 - pika raises what its parsers raise
        query = urlsplit(url).query
        # A query may hold a key's password (ssl_options): then the message is not shown.
        detail = f": {str(exc)[:200]}" if "password" not in query.lower() else ""
        return f"is refused by pika: {type(exc).__name__}{detail}"
    return None


def _vhost(path: str) -> str:
    """The vhost of a URL's path, as pika reads it (no path, or ``/``: the default ``/``)."""
    return unquote(path.split("/")[1]) if len(path) > 1 else "/"


@dataclass(frozen=True, kw_only=True)
class ConsumerSettings:
    """Everything ``pipeline consume`` needs; see the README's configuration reference.

    ``rabbitmq_urls`` are the nodes of one RabbitMQ cluster (one URL for a single broker);
    ``rabbitmq_url`` is the first of them. Give either: the other follows.
    """

    rabbitmq_urls: tuple[str, ...] = ()
    rabbitmq_url: str = ""
    database_url: str
    prefetch: int = 3000
    batch_size: int = 1000
    batch_ms: int = 100
    # Connections that commit batches side by side (pipeline.consumer.Writer); 1: in order.
    db_writers: int = 2
    metrics_port: int = 9102
    log_interval_s: int = 60
    # Reader queries running longer are cancelled (pipeline.watchdog); 0 turns that off.
    reader_query_limit_s: int = 60
    # maintain_partitions() at start and this often (pipeline.retention); 0 turns it off.
    maintain_interval_s: int = 3600
    # How long the consumer waits for PostgreSQL (pipeline.db.DatabaseTimeouts): connecting,
    # a silent network path, one statement, one lock; 0 turns the last two off.
    db_connect_timeout_s: int = 10
    db_tcp_timeout_s: int = 30
    db_statement_timeout_s: int = 30
    db_lock_timeout_s: int = 10
    readings_queue: str = "readings"
    status_queue: str = "node-status"
    dead_queue: str = "readings.dead"
    status_dead_queue: str = "node-status.dead"
    # Signs the origin of dead letters and replays (pipeline.origin); None: nothing is signed,
    # and no replayed message keeps its original routing key.
    dead_letter_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        urls = tuple(self.rabbitmq_urls) or (self.rabbitmq_url,)
        if self.rabbitmq_url and self.rabbitmq_url != urls[0]:
            raise ConfigError(
                "rabbitmq_url must be the first of rabbitmq_urls: give only rabbitmq_urls"
            )
        check_rabbitmq_urls(urls)
        object.__setattr__(self, "rabbitmq_urls", urls)
        object.__setattr__(self, "rabbitmq_url", urls[0])
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set: postgresql://user@host:5432/db")
        if self.prefetch < self.batch_size:
            raise ConfigError(
                f"PIPELINE_PREFETCH={self.prefetch} is smaller than PIPELINE_BATCH_SIZE="
                f"{self.batch_size}: a batch could never fill; use at least twice the batch size"
            )
        self.database_timeouts  # noqa: B018 - checks the values now, not at the first connect

    @property
    def database_timeouts(self) -> DatabaseTimeouts:
        """The limits for the consumer's engine: ``make_engine(url, timeouts=...)``."""
        return DatabaseTimeouts(
            connect_s=self.db_connect_timeout_s,
            tcp_s=self.db_tcp_timeout_s,
            statement_s=self.db_statement_timeout_s,
            lock_s=self.db_lock_timeout_s,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsumerSettings:
        """Read the settings; raise ConfigError naming the variable and value that is wrong."""
        urls = parse_rabbitmq_urls(
            env.get("RABBITMQ_URL", _DEFAULT_RABBITMQ_URL),
            env.get("RABBITMQ_USER"),
            env.get("RABBITMQ_PASSWORD"),
        )
        return cls(
            rabbitmq_urls=urls,
            # Every URL carries the same password (check_rabbitmq_urls): any order, one key.
            dead_letter_key=_dead_letter_key(env, urls[0]),
            database_url=env.get("DATABASE_URL", ""),
            prefetch=_int(env, "PIPELINE_PREFETCH", 3000, 1, 65535),
            batch_size=_int(env, "PIPELINE_BATCH_SIZE", 1000, 1, 50_000),
            batch_ms=_int(env, "PIPELINE_BATCH_MS", 100, 1, 60_000),
            db_writers=_int(env, "PIPELINE_DB_WRITERS", 2, 1, 8),
            metrics_port=_int(env, "PIPELINE_METRICS_PORT", 9102, 0, 65535),
            log_interval_s=_int(env, "PIPELINE_LOG_INTERVAL_S", 60, 1, 86_400),
            reader_query_limit_s=_int(env, "PIPELINE_READER_QUERY_LIMIT_S", 60, 0, 86_400),
            maintain_interval_s=_int(env, "PIPELINE_MAINTAIN_INTERVAL_S", 3600, 0, 86_400),
            db_connect_timeout_s=_int(env, "PIPELINE_DB_CONNECT_TIMEOUT_S", 10, 1, 600),
            db_tcp_timeout_s=_int(env, "PIPELINE_DB_TCP_TIMEOUT_S", 30, 1, 600),
            db_statement_timeout_s=_int(env, "PIPELINE_DB_STATEMENT_TIMEOUT_S", 30, 0, 86_400),
            db_lock_timeout_s=_int(env, "PIPELINE_DB_LOCK_TIMEOUT_S", 10, 0, 86_400),
        )


# A query parameter that carries a password in a libpq URL (`?password=...`, `&sslpassword=...`).
_QUERY_PASSWORD: Final = re.compile(r"(?i)([?&][^=&#]*password=)[^&#]*")


_MIN_KEY_CHARS: Final = 16


def _dead_letter_key(env: Mapping[str, str], rabbitmq_url: str) -> bytes | None:
    """The key that signs dead-letter origins: PIPELINE_DEAD_LETTER_KEY, else the AMQP password.

    Every replica must have the same key (they share the AMQP account, so the default does) and
    no node may know it (nodes have their own accounts). Changing the AMQP password changes the
    default key: dead letters signed before can then no longer be replayed under their node,
    unless PIPELINE_DEAD_LETTER_KEY is set to a fixed secret, which then outlives password
    changes. Without either there is no secret to sign with, and None is returned.

    Raises:
        ConfigError: PIPELINE_DEAD_LETTER_KEY is set but shorter than 16 characters (its value
            is never shown).
    """
    explicit = env.get("PIPELINE_DEAD_LETTER_KEY", "")
    if explicit:
        if len(explicit) < _MIN_KEY_CHARS:
            raise ConfigError(
                f"PIPELINE_DEAD_LETTER_KEY is {len(explicit)} characters long: use at least "
                f"{_MIN_KEY_CHARS} random ones (for example `openssl rand -hex 32`), or unset it "
                "to derive the key from the AMQP password"
            )
        return derive_key(explicit)
    span = _userinfo_end(rabbitmq_url)
    if span is None:
        return None
    password = unquote(rabbitmq_url[span[0] : span[1]])
    return derive_key(password) if password else None


def _userinfo_end(url: str) -> tuple[int, int] | None:
    """Where the password of ``scheme://user:password@host...`` starts and ends, if it has one.

    Not ``urlsplit``: it ends the host part at the first ``/``, ``?`` or ``#``, so an unescaped
    ``amqp://user:pa/ss@host`` would look password-less and be logged whole. A password may
    hold any character, ``@`` included, so the user information runs to the last ``@`` of the
    URL. That can take too much (a URL whose path or query holds an ``@`` loses its host in the
    redacted text), never too little.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    at = url.rfind("@", start)
    if at < 0:
        return None
    colon = url.find(":", start, at)
    if colon < 0:
        return None
    return colon + 1, at


def has_password(url: str) -> bool:
    """True if ``url`` carries a password, in its user information or as a query parameter."""
    return _userinfo_end(url) is not None or _QUERY_PASSWORD.search(url) is not None


def redact(url: str) -> str:
    """The URL with every password replaced by ``***``, for logs and errors.

    Works whatever the password holds (``/``, ``#``, ``?``, ``@``, ``:``, percent escapes):
    see :func:`_userinfo_end`. A ``password=`` query parameter (libpq reads one) is hidden too.
    """
    span = _userinfo_end(url)
    if span is not None:
        url = url[: span[0]] + "***" + url[span[1] :]
        host_start = span[0] + 4  # the query can only follow the host
    else:
        host_start = 0
    return url[:host_start] + _QUERY_PASSWORD.sub(r"\1***", url[host_start:])
