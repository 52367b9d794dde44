"""Connecting to RabbitMQ, one node or the nodes of a cluster: the one connect function.

RABBITMQ_URL may list the nodes of one cluster (pipeline.config checks the list). Every
connection attempt shuffles the list, so that the replicas of the consumer spread over the
nodes, and tries the nodes in turn until one accepts; the node a session was just lost on is
tried last. Each node tried is logged by its URL, password redacted. When no node accepts,
:class:`BrokersUnreachableError` says why for each; waiting before the next round is the
caller's (pipeline.consumer.consume_forever backs off only then).

Everything in the package that opens an AMQP connection (``pipeline consume``, ``pipeline
dead list`` and ``replay``) goes through :func:`connect`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions

from pipeline.config import redact
from pipeline.errors import PipelineError

__all__ = [
    "BrokersUnreachableError",
    "connect",
    "connection_order",
    "describe_error",
    "url_parameters",
]

log = logging.getLogger(__name__)

# What a connection attempt raises when the node is down, unreachable or refuses the login.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)

# Spreads the replicas over the nodes; not cryptography.
_SHUFFLE = random.Random()  # noqa: S311


# pika reports a failed connection attempt at ERROR, in five or so lines and a traceback, none
# of them naming the node by its URL; :func:`connect` logs one line per node instead. While a
# thread connects, pika's records from that thread are dropped, or shown as DEBUG when this
# module logs at DEBUG (LOG_LEVEL=DEBUG); everything pika logs at other times is left alone.
_PIKA_CONNECT_LOGGERS = (
    "pika.adapters.blocking_connection",
    "pika.adapters.base_connection",
    "pika.adapters.utils.connection_workflow",
    "pika.adapters.utils.io_services_utils",
    "pika.adapters.utils.selector_ioloop_adapter",
    "pika.connection",
)
_connecting = threading.local()


class _DemoteWhileConnecting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not getattr(_connecting, "active", False):
            return True
        if not log.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_DEMOTE = _DemoteWhileConnecting()
for _name in _PIKA_CONNECT_LOGGERS:
    logging.getLogger(_name).addFilter(_DEMOTE)


@contextmanager
def _quiet_pika() -> Iterator[None]:
    _connecting.active = True
    try:
        yield
    finally:
        _connecting.active = False


class BrokersUnreachableError(PipelineError, pika.exceptions.AMQPConnectionError):
    """No node of the list accepted a connection; the message says why for each one."""


def connection_order(
    urls: Sequence[str], *, lost: str | None = None, rng: random.Random | None = None
) -> list[str]:
    """The order in which to try ``urls``: shuffled, with ``lost`` (if listed) last.

    Args:
        urls: the nodes' URLs.
        lost: the node the previous session was lost on; with more than one node the next
            attempt starts elsewhere, and tries that node only when all others failed.
        rng: the shuffle's random source (tests pass a seeded one).
    """
    order = [url for url in urls if url != lost]
    (rng or _SHUFFLE).shuffle(order)
    if lost is not None and len(order) < len(urls):
        order.append(lost)
    return order


def connect(
    urls: str | Sequence[str],
    *,
    lost: str | None = None,
    heartbeat: int | None = None,
    blocked_connection_timeout: float | None = None,
    rng: random.Random | None = None,
) -> tuple[pika.BlockingConnection, str]:
    """A connection to the first node that accepts one, and that node's URL.

    Tries every node once, in :func:`connection_order`, each with pika's own settings from
    its URL (``socket_timeout``, ``connection_attempts``... in the query string); ``heartbeat``
    and ``blocked_connection_timeout``, if given, override the URL's.

    Raises:
        BrokersUnreachableError: no node accepted; the message names each (redacted) and why.
    """
    listed = (urls,) if isinstance(urls, str) else tuple(urls)
    order = connection_order(listed, lost=lost, rng=rng)
    failures: list[str] = []
    for tried, url in enumerate(order, 1):
        params = url_parameters(url)
        if heartbeat is not None:
            params.heartbeat = heartbeat
        if blocked_connection_timeout is not None:
            params.blocked_connection_timeout = blocked_connection_timeout
        try:
            with _quiet_pika():
                connection = pika.BlockingConnection(params)
        except _CONNECT_ERRORS as exc:
            why = describe_error(exc, url)
            failures.append(f"{redact(url)}: {why}")
            log.warning(
                "RabbitMQ node unreachable or refused node=%s tried=%d/%d error=%s",
                redact(url),
                tried,
                len(order),
                why,
            )
            continue
        log.info("connected to RabbitMQ node=%s tried=%d/%d", redact(url), tried, len(order))
        return connection, url
    if len(failures) == 1:
        raise BrokersUnreachableError(f"RabbitMQ unreachable or refused: {failures[0]}")
    raise BrokersUnreachableError(
        f"no RabbitMQ node of {len(failures)} reachable: " + "; ".join(failures)
    )


def url_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``.

    A URL with a user and no password (``amqp://pipeline@host/``) makes pika raise a
    TypeError; it gets an empty password instead, which the broker refuses like any wrong
    one: logged and retried, never a crash.
    """
    parts = urlsplit(url)
    if parts.username is not None and parts.password is None:
        at = url.index("://") + 3 + parts.netloc.rindex("@")
        url = url[:at] + ":" + url[at:]
    return pika.URLParameters(url)


def describe_error(exc: BaseException, url: str) -> str:
    """One line about a connection error, without the URL's password even if pika echoed it."""
    if isinstance(exc, pika.exceptions.AMQPConnectionError) and exc.args:
        # pika wraps the socket's error: AMQPConnectionError(ConnectionRefusedError(...)).
        inner = exc.args[0] if len(exc.args) == 1 else exc
        text = repr(inner) if isinstance(inner, BaseException) else repr(exc)
    else:
        text = repr(exc)
    text = " ".join(text.split())[:300]
    password = urlsplit(url).password
    for secret in {password, unquote(password)} if password else ():
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text
