"""The kernel's clocks, faked at the lowest layer: a Pi's wall clock, right or wrong."""

from __future__ import annotations


class FakeClock:
    """A :class:`edge_agent.clock.ClockSource` the test sets by hand."""

    def __init__(
        self, *, synced: bool, wall: float, boottime: float = 100.0, boot_id: str = "boot-1"
    ) -> None:
        self.synced = synced
        self.now = wall
        self.since_boot = boottime
        self.boot = boot_id

    def synchronized(self) -> bool:
        return self.synced

    def wall(self) -> float:
        return self.now

    def boottime(self) -> float:
        return self.since_boot

    def boot_id(self) -> str:
        return self.boot

    def advance(self, seconds: float) -> None:
        """Time passes: both clocks move on together."""
        self.now += seconds
        self.since_boot += seconds
