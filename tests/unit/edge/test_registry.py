"""The registry: one driver class per contract kind, configuration validated from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest

from edge_agent.config import AgentConfig, SensorConfig
from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors import Calibrated, Sample, Sensor, Simulated
from edge_agent.sensors.fields import Field, Settings
from edge_agent.sensors.registry import REGISTRY, Registry, build_sensor, build_sensors
from tempmon_contract.kinds import KINDS, Kind

AGENT = AgentConfig(node_id="pi", w1_root=Path("/nonexistent"))


def test_every_contract_kind_has_a_driver_in_the_contracts_order() -> None:
    assert REGISTRY.kinds() == tuple(KINDS)
    for driver in REGISTRY:
        assert driver.KIND is KINDS[driver.KIND.name]


def _driver(of_kind: Kind, with_fields: tuple[Field, ...] = ()) -> type:
    class Thermistor:
        KIND: ClassVar[Kind] = of_kind
        FIELDS: ClassVar[tuple[Field, ...]] = with_fields
        MIN_INTERVAL_S: ClassVar[float] = 1.0

        @property
        def id(self) -> str:
            return "t"

        @property
        def kind(self) -> str:
            return self.KIND.name

        def read(self) -> Sample:
            return Sample(20.0)

        def close(self) -> None:
            pass

        @classmethod
        def settle(cls, where: str, sensor_id: str, settings: dict[str, object]) -> None:
            pass

        @classmethod
        def from_settings(cls, sensor_id: str, settings: Settings, *, w1_root: Path) -> Sensor:  # noqa: ARG003 - the registry calls every driver alike
            return cls()

    return Thermistor


def test_a_driver_for_a_kind_the_contract_lacks_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"Thermistor is for kind 'thermistor', which the contract"
    ):
        Registry([_driver(Kind("thermistor", (-50, 150)))])  # type: ignore[list-item]


def test_a_changed_copy_of_a_contract_kind_is_refused() -> None:
    wider = dataclasses.replace(KINDS["ds18b20"], temperature=(-100, 200))
    with pytest.raises(ValueError, match="which the contract lacks"):
        Registry([_driver(wider)])  # type: ignore[list-item]


def test_two_drivers_for_one_kind_are_refused() -> None:
    registry = Registry([_driver(KINDS["cpu"])])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="already has"):
        registry.register(_driver(KINDS["cpu"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["interval_s", "offset_c", "id"])
def test_a_field_may_not_shadow_a_common_key(name: str) -> None:
    with pytest.raises(ValueError, match=f"field '{name}'"):
        Registry([_driver(KINDS["cpu"], (Field(name, float, 1.0),))])  # type: ignore[list-item]


def test_a_default_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ValueError, match="default 'x' is not a int"):
        Registry([_driver(KINDS["cpu"], (Field("gain", int, "x"),))])  # type: ignore[list-item]


def test_an_unknown_kind_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="ds18b20, dht22, cpu, simulated, bme280"):
        REGISTRY.driver("thermistor")


def test_users_of_a_key() -> None:
    assert REGISTRY.users_of("pin") == ("dht22",)
    assert REGISTRY.users_of("address") == ("bme280",)
    assert REGISTRY.users_of("nope") == ()


def test_build_sensor_is_a_lookup_and_always_holds_to_the_contract() -> None:
    config = SensorConfig(id="sim-9", kind="simulated", settings={"seed": 4, "humidity": True})
    sensor = build_sensor(config, AGENT)
    assert isinstance(sensor, Calibrated)
    assert isinstance(sensor.sensor, Simulated)
    assert sensor.sensor.has_humidity
    assert sensor.read().humidity_pct is not None


def test_defaults_fill_in_what_the_configuration_left_out() -> None:
    sensor = build_sensor(SensorConfig(id="sim-1", kind="simulated"), AGENT)
    assert isinstance(sensor, Calibrated)
    assert isinstance(sensor.sensor, Simulated)
    assert not sensor.sensor.has_humidity


def test_a_simulator_past_its_range_is_a_read_error_not_a_reading() -> None:
    """The contract's range holds even without an offset: 149 °C ± noise can pass 150."""
    config = SensorConfig(id="hot", kind="simulated", offset_c=20.0, settings={"seed": 1})
    sensor = build_sensor(config, AGENT)
    assert isinstance(sensor, Calibrated)
    sensor.sensor._base_c = 140.0  # type: ignore[attr-defined]
    with pytest.raises(SensorError, match=r"sensor hot: temperature_c .*offset_c \+20"):
        sensor.read()


def test_ds18b20_under_a_friendly_name() -> None:
    config = SensorConfig(id="kitchen", kind="ds18b20", settings={"device": "28-0316a2b4c5ff"})
    sensor = build_sensor(config, AGENT)
    assert (sensor.id, sensor.kind) == ("kitchen", "ds18b20")


def test_build_sensors_keeps_the_order() -> None:
    agent = dataclasses.replace(
        AGENT,
        sensors=(
            SensorConfig(id="b", kind="simulated"),
            SensorConfig(id="a", kind="cpu"),
            SensorConfig(id="c", kind="bme280"),
        ),
    )
    assert [(s.id, s.kind) for s in build_sensors(agent)] == [
        ("b", "simulated"),
        ("a", "cpu"),
        ("c", "bme280"),
    ]
