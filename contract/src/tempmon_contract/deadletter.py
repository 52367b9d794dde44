"""The headers of a dead letter: what the pipeline writes on a message it could not use, and
what ``pipeline dead list`` / ``pipeline dead replay`` (and an operator's own tools) read back.

Names only; the pipeline's ``deadletters`` module writes and reads them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BROKER_DEATH_HEADERS",
    "QUEUE_HEADER",
    "REASON_HEADER",
    "REJECTED_AT_HEADER",
    "REJECTED_BY_HEADER",
    "REPLAYED_HEADER",
    "ROUTING_KEY_HEADER",
    "SIGNATURE_HEADER",
]

ROUTING_KEY_HEADER: Final = "x-original-routing-key"
"""The routing key the message arrived with (``sensors.<node>.<sensor>``)."""
QUEUE_HEADER: Final = "x-original-queue"
"""The queue it was consumed from."""
REASON_HEADER: Final = "x-reject-reason"
"""Why it was not stored: the field and the value (the decoder's reason)."""
REJECTED_AT_HEADER: Final = "x-rejected-at"
"""When, RFC 3339 UTC."""
REJECTED_BY_HEADER: Final = "x-rejected-by"
"""Which program: ``pipeline <version>``."""
SIGNATURE_HEADER: Final = "x-pipeline-signature"
"""HMAC of the claimed origin, so a replay cannot be steered to another node's key."""
REPLAYED_HEADER: Final = "x-replayed"
"""How many times ``pipeline dead replay`` put it back."""
BROKER_DEATH_HEADERS: Final = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    }
)
"""The headers RabbitMQ adds when it dead-letters a message itself."""
