"""What a driver declares about itself: its kind, its configuration fields, its minimum interval.

The registry (:mod:`edge_agent.sensors.registry`) reads these declarations; the configuration
loader validates each ``[[sensors]]`` table against them, so a new kind needs no change there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from edge_agent.sensors.base import Sensor
from tempmon_contract.kinds import Kind

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["COMMON_FIELDS", "Driver", "Field", "Settings"]

COMMON_FIELDS = frozenset({"id", "kind", "interval_s", "offset_c", "median_window"})
"""The keys every ``[[sensors]]`` table may have, whatever its kind (see ``config.py``)."""


@dataclass(frozen=True, slots=True)
class Field:
    """One configuration key of a kind, beyond :data:`COMMON_FIELDS`.

    ``type`` is one of ``int``, ``float``, ``bool`` or ``str``; ``low``/``high`` bound a
    number (inclusive). ``parse``, when given, takes the key (``sensors[0].address``) and the
    raw TOML value and returns the value, or raises ``ConfigError`` naming the key and the
    value; it replaces the type and range checks. ``required`` fields have no default: the
    error says ``help``.
    """

    name: str
    type: type[int] | type[float] | type[bool] | type[str]
    default: int | float | bool | str | None = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    required: bool = False
    parse: Callable[[str, object], int | float | bool | str] | None = None


class Settings:
    """A sensor's driver settings, typed on the way out: every field has its value or default."""

    def __init__(self, values: Mapping[str, object]) -> None:
        self._values = dict(values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"

    def get(self, name: str) -> object:
        return self._values.get(name)

    def integer(self, name: str) -> int | None:
        value = self._values.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"setting {name} = {value!r} is not an integer")
        return value

    def number(self, name: str) -> float:
        value = self._values.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"setting {name} = {value!r} is not a number")
        return float(value)

    def flag(self, name: str) -> bool:
        return bool(self._values.get(name, False))

    def text(self, name: str) -> str | None:
        value = self._values.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError(f"setting {name} = {value!r} is not a string")
        return value


class Driver(Sensor, Protocol):
    """A sensor class the registry can build from configuration.

    ``KIND`` must be one of the contract's :data:`tempmon_contract.kinds.KINDS` (the registry
    refuses any other). ``FIELDS`` are its configuration keys beyond :data:`COMMON_FIELDS`;
    ``MIN_INTERVAL_S`` is the shortest ``interval_s`` it allows (a DHT22 needs 2 s).
    """

    KIND: ClassVar[Kind]
    FIELDS: ClassVar[tuple[Field, ...]]
    MIN_INTERVAL_S: ClassVar[float]

    @classmethod
    def settle(cls, where: str, sensor_id: str, settings: dict[str, object]) -> None:
        """Check the fields together (or derive one from the id), in place.

        ``where`` is the table's name for messages (``sensors[0]``).

        Raises:
            ConfigError: names ``where.<field>`` and the value.
        """
        ...

    @classmethod
    def from_settings(cls, sensor_id: str, settings: Settings, *, w1_root: Path) -> Sensor:
        """The driver for one configured sensor (no offset or filter: the registry adds them).

        Raises:
            ConfigError: a setting the driver refuses.
        """
        ...
