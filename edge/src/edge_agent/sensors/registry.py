"""The sensor kinds the agent can build: one registered driver class per contract kind.

A driver class declares its kind (from :data:`tempmon_contract.kinds.KINDS`), its
configuration fields and its minimum interval (see :class:`~edge_agent.sensors.fields.Driver`);
``config.py`` validates ``[[sensors]]`` tables from these declarations, and :func:`build_sensor`
is a lookup. Adding a kind: its :class:`~tempmon_contract.kinds.Kind` in the contract, its
driver class here in :data:`REGISTRY`; nothing else on the edge changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from edge_agent.errors import ConfigError
from edge_agent.sensors.base import Calibrated, Sensor
from edge_agent.sensors.bme280 import BME280
from edge_agent.sensors.cpu import CPUTemp
from edge_agent.sensors.dht22 import DHT22
from edge_agent.sensors.ds18b20 import DS18B20
from edge_agent.sensors.fields import COMMON_FIELDS, Driver, Field, Settings
from edge_agent.sensors.simulator import Simulated
from tempmon_contract.kinds import KINDS

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig, SensorConfig

__all__ = ["REGISTRY", "Registry", "build_sensor", "build_sensors"]


class Registry:
    """Driver classes by kind name, in the contract's order of kinds."""

    def __init__(self, drivers: Iterable[type[Driver]] = ()) -> None:
        self._drivers: dict[str, type[Driver]] = {}
        for driver in drivers:
            self.register(driver)

    def register(self, driver: type[Driver]) -> type[Driver]:
        """Add ``driver``; return it (usable as a class decorator).

        Raises:
            ValueError: its ``KIND`` is not the contract's kind of that name (a kind the
                contract lacks, or a changed copy of one), a driver for that kind is already
                registered, a field repeats a common key (``id``, ``kind``, ``interval_s``,
                ``offset_c``, ``median_window``) or another of its fields, or a field's
                default is not of its type.
        """
        kind = getattr(driver, "KIND", None)
        name = getattr(kind, "name", None)
        if not isinstance(name, str) or KINDS.get(name) != kind:
            raise ValueError(
                f"driver {driver.__name__} is for kind {name!r}, which the contract lacks: "
                f"add its Kind to tempmon_contract.kinds.KINDS first (it has {', '.join(KINDS)})"
            )
        if name in self._drivers:
            other = self._drivers[name].__name__
            raise ValueError(f"driver {driver.__name__}: kind {name!r} already has {other}")
        seen: set[str] = set()
        for field in driver.FIELDS:
            if field.name in COMMON_FIELDS or field.name in seen:
                raise ValueError(
                    f"driver {driver.__name__}: field {field.name!r} is declared twice"
                )
            if field.default is not None and not isinstance(field.default, field.type):
                raise ValueError(
                    f"driver {driver.__name__}: field {field.name!r} default {field.default!r} "
                    f"is not a {field.type.__name__}"
                )
            seen.add(field.name)
        self._drivers[name] = driver
        order = list(KINDS)
        self._drivers = dict(sorted(self._drivers.items(), key=lambda kv: order.index(kv[0])))
        return driver

    def __contains__(self, kind: object) -> bool:
        return kind in self._drivers

    def __iter__(self) -> Iterator[type[Driver]]:
        return iter(self._drivers.values())

    def kinds(self) -> tuple[str, ...]:
        """The kinds that can be configured, in the contract's order."""
        return tuple(self._drivers)

    def driver(self, kind: str) -> type[Driver]:
        """The driver class of ``kind``.

        Raises:
            ConfigError: no driver is registered for it; the message lists those that are.
        """
        try:
            return self._drivers[kind]
        except KeyError:
            raise ConfigError(f"kind {kind!r} must be one of {', '.join(self._drivers)}") from None

    def users_of(self, key: str) -> tuple[str, ...]:
        """The kinds that have a field called ``key``."""
        return tuple(
            name
            for name, driver in self._drivers.items()
            if any(field.name == key for field in driver.FIELDS)
        )

    def settings(self, config: SensorConfig) -> Settings:
        """``config``'s driver settings with every field's default filled in."""
        fields: tuple[Field, ...] = self.driver(config.kind).FIELDS
        values: dict[str, object] = {field.name: field.default for field in fields}
        values.update(config.settings)
        return Settings(values)

    def build_sensor(self, config: SensorConfig, agent: AgentConfig) -> Sensor:
        """The driver for one configured sensor, wrapped with its offset and median filter.

        The wrapper (:class:`~edge_agent.sensors.base.Calibrated`) is always there: it also
        holds every reading to the kind's ranges in the contract, so a value the pipeline would
        dead-letter is a read error on the node instead.

        Raises:
            ConfigError: the kind has no driver, or the driver refuses a setting.
        """
        driver = self.driver(config.kind)
        sensor = driver.from_settings(config.id, self.settings(config), w1_root=agent.w1_root)
        return Calibrated(sensor, offset_c=config.offset_c, median_window=config.median_window)


REGISTRY = Registry((DS18B20, DHT22, CPUTemp, Simulated, BME280))
"""The drivers the agent ships, one for each kind of the contract."""


def build_sensor(config: SensorConfig, agent: AgentConfig) -> Sensor:
    """:meth:`Registry.build_sensor` of :data:`REGISTRY`."""
    return REGISTRY.build_sensor(config, agent)


def build_sensors(agent: AgentConfig) -> list[Sensor]:
    """Every configured sensor, in the configuration's order."""
    return [build_sensor(s, agent) for s in agent.sensors]
