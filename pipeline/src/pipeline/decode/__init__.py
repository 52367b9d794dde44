"""Decode and validate the messages on the ``readings`` and ``node-status`` queues.

The wire contract is :mod:`tempmon_contract` (ids, kinds and their ranges, field lists,
limits), published as the JSON Schema files in ``gateway/schema/``. This package is its
executable form on the consumer's hot path, so it uses plain Python checks instead of a
schema validator: a typical reading decodes in a few microseconds. One module per message
kind: :mod:`~pipeline.decode.reading` (v1 and legacy readings), :mod:`~pipeline.decode.fast`
(the msgspec fast path for canonical v1 readings), :mod:`~pipeline.decode.status`; what they
share is in ``_common``.

Every function here either returns a value that is safe to write to PostgreSQL or raises
:class:`~pipeline.errors.Rejected`, whose ``reason`` names the field and the offending value
(clipped, and escaped by ``repr``, so a hostile payload cannot flood a log line or an AMQP
header). Nothing else escapes for any input ``bytes`` and routing key.
"""

from __future__ import annotations

from datetime import datetime

from pipeline.decode.fast import decode_reading_fast
from pipeline.decode.reading import LEGACY_KIND, LEGACY_NODE, Reading, decode_reading_full
from pipeline.decode.status import NodeStatus, decode_status
from tempmon_contract.wire import MAX_PAYLOAD_BYTES

__all__ = [
    "LEGACY_KIND",
    "LEGACY_NODE",
    "MAX_PAYLOAD_BYTES",
    "NodeStatus",
    "Reading",
    "decode_reading",
    "decode_reading_fast",
    "decode_reading_full",
    "decode_status",
]


def decode_reading(body: bytes, routing_key: str, *, now: datetime) -> Reading:
    """Decode one delivery from the ``readings`` queue.

    A payload with a ``version`` key is a v1 reading and must arrive on
    ``sensors.<node>.<sensor>`` naming the same node and sensor; a payload with ``temperatura``
    and no ``version`` is the course's legacy form and may arrive on any routing key.

    Args:
        body: the message body as delivered.
        routing_key: the AMQP routing key (the MQTT topic with ``/`` turned into ``.``).
        now: the receiver's current time, aware; readings more than 300 s after it are rejected.

    Raises:
        Rejected: for any payload or routing key that cannot become a row; ``reason`` says why.
        TypeError: only if ``now`` is naive (a caller's bug, not an input's).
    """
    fast = decode_reading_fast(body, routing_key, now=now)
    if fast is not None:
        return fast
    return decode_reading_full(body, routing_key, now=now)
