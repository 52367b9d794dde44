"""How both wings wait before connecting again: capped, jittered exponential back-off.

Not a message format, but a behaviour the two wings share towards the broker: a fleet of Pis
or a set of consumer replicas that lost the broker together must not come back in step.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Capped, jittered exponential back-off that resets after a healthy run.

    Each :meth:`next` returns a wait drawn from [d/2, d], where d starts at ``initial`` and
    doubles per call up to ``cap``.
    """

    def __init__(self, initial: float = 1.0, cap: float = 60.0) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"back-off: initial {initial!r} must be > 0 and <= cap {cap!r}")
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        """The next wait; the one after it is twice as long (up to ``cap``)."""
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not cryptography

    def short(self) -> float:
        """A wait of the first step's size, jittered; the back-off does not grow."""
        return random.uniform(self.initial / 2, self.initial)  # noqa: S311 - jitter

    def reset(self) -> None:
        """After a healthy run: the next wait is the first step's again."""
        self._next = self.initial
