"""How the agent paces its reconnects, and which broker it tries next.

The session (:mod:`edge_agent.session`) owns one connection and ends when it drops; these two
decide when and where the next one goes: :class:`Backoff` (``tempmon_contract.retry``, shared
with the pipeline) is capped, jittered and resets after a healthy run, :class:`BrokerRotation`
walks the configured brokers in an order of the agent's own, with a short wait inside a round
and the back-off only after a whole round failed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from edge_agent.config import Broker
from tempmon_contract.retry import Backoff

__all__ = ["Backoff", "BrokerRotation"]


class BrokerRotation:
    """Which broker the agent tries next, and how long it waits before trying it.

    The brokers are put in an order of this agent's own, shuffled once (by ``rng``, by default
    the operating system's randomness), so that the Pis of a site, configured alike, start on
    different nodes of the cluster. The agent connects to :attr:`current`; when an attempt
    fails, the broker refuses the CONNACK or a session ends for any reason, :meth:`failed`
    moves on to the next broker in that order and says how long to wait.

    An operator expects a dead node to cost seconds, not the back-off's minute, and a cluster
    that is down not to be hammered. So the wait is short (:meth:`Backoff.short`: half to all
    of ``Backoff.initial``, jittered) while a round is incomplete, and the failure that
    completes a round (one failure per broker, in a row) waits :meth:`Backoff.next`, which
    doubles with each round up to its cap. A session that ran well for
    :data:`edge_agent.session.HEALTHY_S` starts the count and the back-off over. With one
    broker every failure completes a round: the agent paces its reconnects exactly as it does
    with a single ``mqtt.host``.
    """

    def __init__(
        self, brokers: Sequence[Broker], backoff: Backoff, *, rng: random.Random | None = None
    ) -> None:
        """Raises ValueError: no brokers."""
        if not brokers:
            raise ValueError("at least one broker is needed")
        order = list(brokers)
        (rng or random.SystemRandom()).shuffle(order)
        self.order: tuple[Broker, ...] = tuple(order)
        self.backoff = backoff
        self._index = 0
        self._failures = 0  # in a row, since the start or the last healthy session

    @property
    def current(self) -> Broker:
        """The broker of the session (or of the attempt) in progress, or of the next one."""
        return self.order[self._index]

    @property
    def failures(self) -> int:
        """Failed attempts and sessions in a row, since the start or the last healthy session."""
        return self._failures

    def failed(self, *, healthy: bool = False) -> float:
        """The current broker failed: move on to the next one; return the wait before it.

        ``healthy``: the session that just ended ran well for
        :data:`edge_agent.session.HEALTHY_S` first.
        """
        if healthy:
            self.backoff.reset()
            self._failures = 0
        self._failures += 1
        self._index = (self._index + 1) % len(self.order)
        if self._failures % len(self.order) == 0:
            return self.backoff.next()
        return self.backoff.short()
