"""The sensor kinds a reading may name, what each measures and within which range.

This table is the one place a kind is declared for the wire: the edge agent's drivers name
their kind from it (and refuse to build a kind it lacks), the pipeline's decoder takes each
kind's ranges and optional fields from it, and a migration's SQL CHECK lists its names
(``tests/unit/test_contract.py`` and ``tests/system/test_database.py`` hold the JSON Schema and
the database to it). Adding a kind: one :class:`Kind` here, then its driver on the edge
(CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

__all__ = [
    "HUMIDITY",
    "KINDS",
    "LEGACY",
    "OPTIONAL_QUANTITIES",
    "PRESSURE",
    "TEMPERATURE",
    "Kind",
    "Quantity",
    "kind",
]


@dataclass(frozen=True, slots=True)
class Quantity:
    """One measured field of a reading."""

    field: str
    """The field's name on the wire (and the column's in PostgreSQL)."""
    name: str
    """What it is, for messages: ``humidity``."""
    unit: str
    low: float
    """The widest range any kind may report (each kind may narrow it)."""
    high: float
    decimals: int
    """Digits after the point the agent keeps on the wire (below every sensor's resolution)."""


TEMPERATURE: Final = Quantity("temperature_c", "temperature", "°C", -100, 150, 4)
HUMIDITY: Final = Quantity("humidity_pct", "relative humidity", "%", 0, 100, 3)
PRESSURE: Final = Quantity("pressure_hpa", "air pressure", "hPa", 300, 1100, 3)

OPTIONAL_QUANTITIES: Final[tuple[Quantity, ...]] = (HUMIDITY, PRESSURE)
"""The measured fields a reading may carry besides ``temperature_c``, in wire order."""


@dataclass(frozen=True, slots=True)
class Kind:
    """A kind of sensor: what it measures and the range it can measure it in."""

    name: str
    temperature: tuple[float, float]
    """Inclusive range of ``temperature_c`` in °C (the datasheet's)."""
    measures: frozenset[str] = frozenset()
    """The optional fields (``humidity_pct``, ``pressure_hpa``) this kind may carry."""
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=lambda: MappingProxyType({}))
    """Narrower ranges than the :class:`Quantity`'s for some of those fields."""
    can: str = ""
    """How a message names its range: ``a ds18b20 can measure``."""
    description: str = ""

    def range_of(self, field: str) -> tuple[float, float]:
        """The inclusive range of one measured field for this kind."""
        if field == TEMPERATURE.field:
            return self.temperature
        if field in self.ranges:
            return self.ranges[field]
        for quantity in OPTIONAL_QUANTITIES:
            if quantity.field == field:
                return quantity.low, quantity.high
        raise KeyError(field)

    @property
    def phrase(self) -> str:
        return self.can or f"a {self.name} can measure"


def _kinds(*kinds: Kind) -> Mapping[str, Kind]:
    return MappingProxyType({k.name: k for k in kinds})


KINDS: Final[Mapping[str, Kind]] = _kinds(
    # Datasheet ranges: DS18B20 -55..+125 °C; DHT22 (AM2302) -40..+80 °C, 0..100 % RH; BME280
    # -40..+85 °C, 0..100 % RH, 300..1100 hPa; the BCM SoC's sensor is specified -40..+85 °C
    # and reads up to its 125 °C limit before shutdown.
    Kind("ds18b20", (-55, 125), description="1-Wire digital thermometer"),
    Kind(
        "dht22",
        (-40, 80),
        frozenset({HUMIDITY.field}),
        description="temperature and humidity on one GPIO pin (AM2302)",
    ),
    Kind("cpu", (-40, 125), description="the Raspberry Pi SoC's own temperature"),
    Kind(
        "simulated",
        (-100, 150),
        frozenset({HUMIDITY.field}),
        can="a simulated sensor may report",
        description="the agent's simulator, for laptops and tests",
    ),
    Kind(
        "bme280",
        (-40, 85),
        frozenset({HUMIDITY.field, PRESSURE.field}),
        description="temperature, humidity and air pressure over I2C (Bosch BME280)",
    ),
)
"""The kinds a v1 reading may name, in the order they were added (never reorder or remove:
stored readings name them)."""

LEGACY: Final = Kind(
    "legacy", (-100, 150), can="the legacy form allows", description="the course's legacy form"
)
"""What the pipeline stores as the kind of a reading that arrived in the course's legacy form
(``id``, ``data``, ``temperatura``); never a v1 kind."""


def kind(name: str) -> Kind:
    """The kind called ``name``.

    Raises:
        KeyError: no v1 kind has that name.
    """
    return KINDS[name]
