"""One contract, every implementation: each sensor kind, built on its fake, behaves alike."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from edge_agent.errors import SensorError
from edge_agent.sensors import (
    BME280,
    DHT22,
    DS18B20,
    SENSOR_ID_PATTERN,
    Calibrated,
    CPUTemp,
    DHTDevice,
    Sample,
    Sensor,
    Simulated,
    check_sample,
)
from tempmon_contract.kinds import KINDS as CONTRACT_KINDS

W1_SLAVE = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"


class FakeDHT:
    def __init__(self) -> None:
        self.exit_calls = 0

    @property
    def temperature(self) -> float | None:
        return 21.3

    @property
    def humidity(self) -> float | None:
        return 45.5

    def exit(self) -> None:
        self.exit_calls += 1


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def ds18b20(tmp_path: Path) -> Sensor:
    device = tmp_path / "w1" / "28-0316a2b4c5ff"
    device.mkdir(parents=True)
    (device / "w1_slave").write_text(W1_SLAVE)
    return DS18B20("28-0316a2b4c5ff", root=tmp_path / "w1", sleep=lambda _: None)


def dht22(_tmp_path: Path) -> Sensor:
    device = FakeDHT()
    time = FakeTime()

    def factory(_pin: int) -> DHTDevice:
        return device

    return DHT22("dht-1", 4, device_factory=factory, clock=time.clock, sleep=time.sleep)


def cpu(tmp_path: Path) -> Sensor:
    (tmp_path / "temp").write_text("48312\n")
    return CPUTemp(sensor_file=str(tmp_path / "temp"), pin_factory=MockFactory())


def simulated(_tmp_path: Path) -> Sensor:
    return Simulated("sim-3", seed=1, humidity=True, clock=lambda: 1_748_736_000.0)


def bme280(_tmp_path: Path) -> Sensor:
    pytest.importorskip("adafruit_bme280")
    from edge_agent.sensors.fakes import FakeBME280Bus  # noqa: PLC0415

    bus = FakeBME280Bus(temperature_c=18.25, humidity_pct=55.5, pressure_hpa=1002.0)
    return BME280("bme-1", i2c=lambda _number: bus)


def calibrated(tmp_path: Path) -> Sensor:
    return Calibrated(simulated(tmp_path), offset_c=-0.5, median_window=3)


# (factory, expected id, expected kind, measures humidity)
KINDS: dict[str, tuple[Callable[[Path], Sensor], str, str, bool]] = {
    "bme280": (bme280, "bme-1", "bme280", True),
    "ds18b20": (ds18b20, "28-0316a2b4c5ff", "ds18b20", False),
    "dht22": (dht22, "dht-1", "dht22", True),
    "cpu": (cpu, "cpu", "cpu", False),
    "simulated": (simulated, "sim-3", "simulated", True),
    "calibrated": (calibrated, "sim-3", "simulated", True),
}


@pytest.fixture(params=sorted(KINDS))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Sensor, str, str, bool]]:
    factory, sensor_id, kind, humidity = KINDS[request.param]
    sensor = factory(tmp_path)
    yield sensor, sensor_id, kind, humidity
    sensor.close()


def test_is_a_sensor(case: tuple[Sensor, str, str, bool]) -> None:
    sensor, _, _, _ = case
    assert isinstance(sensor, Sensor)


def test_id_and_kind(case: tuple[Sensor, str, str, bool]) -> None:
    sensor, sensor_id, kind, _ = case
    assert sensor.id == sensor_id
    assert SENSOR_ID_PATTERN.fullmatch(sensor.id)
    assert sensor.kind == kind
    assert kind in CONTRACT_KINDS


def test_read_returns_finite_floats(case: tuple[Sensor, str, str, bool]) -> None:
    sensor, _, _, humidity = case
    for _ in range(3):
        sample = sensor.read()
        assert type(sample) is Sample
        assert isinstance(sample.temperature_c, float)
        assert math.isfinite(sample.temperature_c)
        if humidity:
            assert isinstance(sample.humidity_pct, float)
            assert math.isfinite(sample.humidity_pct)
            assert 0.0 <= sample.humidity_pct <= 100.0
        else:
            assert sample.humidity_pct is None


def test_close_twice(case: tuple[Sensor, str, str, bool]) -> None:
    sensor, _, _, _ = case
    sensor.read()
    sensor.close()
    sensor.close()


def test_close_without_a_read(case: tuple[Sensor, str, str, bool]) -> None:
    sensor, _, _, _ = case
    sensor.close()
    sensor.close()


def test_read_after_close_is_a_sensor_error(case: tuple[Sensor, str, str, bool]) -> None:
    sensor, _, _, _ = case
    sensor.read()
    sensor.close()
    with pytest.raises(SensorError, match="closed"):
        sensor.read()


def test_readings_are_what_the_contract_allows_for_the_kind(
    case: tuple[Sensor, str, str, bool],
) -> None:
    """Every field within the kind's range, and pressure exactly where the kind measures it."""
    sensor, _, kind, _ = case
    sample = sensor.read()
    assert check_sample(sensor.id, sensor.kind, sample) is sample
    assert (sample.pressure_hpa is not None) == ("pressure_hpa" in CONTRACT_KINDS[kind].measures)
