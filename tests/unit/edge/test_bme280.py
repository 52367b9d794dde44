"""BME280: the real adafruit_bme280 library on a fake I2C bus that emulates the chip's registers."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, SensorConfig
from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors import BME280, Calibrated, Sample
from edge_agent.sensors.bme280 import parse_address
from edge_agent.sensors.fakes import FakeBME280Bus
from edge_agent.sensors.registry import REGISTRY, build_sensor

pytest.importorskip("adafruit_bme280")


def on(bus: FakeBME280Bus, sensor_id: str = "weather", **kwargs: object) -> BME280:
    """A BME280 driver whose bus is ``bus``; everything above the bus is the real library."""
    return BME280(sensor_id, address=bus.address, i2c=lambda _number: bus, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("temperature", "humidity", "pressure"),
    [(21.5, 45.0, 1013.25), (-39.5, 0.5, 300.5), (84.5, 99.5, 1099.5), (0.0, 50.0, 850.0)],
)
def test_reads_what_the_chip_measures(temperature: float, humidity: float, pressure: float) -> None:
    bus = FakeBME280Bus(temperature_c=temperature, humidity_pct=humidity, pressure_hpa=pressure)
    with on(bus) as sensor:
        sample = sensor.read()
    # Within the chip's resolution as the library computes it: t_fine is in 1/5120 °C, the
    # 20-bit pressure ADC is worth a few Pa, the 16-bit humidity ADC about 0.01 %RH.
    assert sample.temperature_c == pytest.approx(temperature, abs=0.001)
    assert sample.humidity_pct == pytest.approx(humidity, abs=0.02)
    assert sample.pressure_hpa == pytest.approx(pressure, abs=0.01)
    assert (sensor.id, sensor.kind) == ("weather", "bme280")


def test_the_datasheets_worked_example() -> None:
    """Bosch's example: raw temperature 519888 and pressure 415148 give 25.08 °C, 1006.53 hPa."""
    bus = FakeBME280Bus()
    bus.raw = (519888, 415148, 30000)
    sample = on(bus).read()
    assert sample.temperature_c == pytest.approx(25.08, abs=0.005)
    assert sample.pressure_hpa == pytest.approx(1006.5327, abs=0.001)


def test_the_library_sets_the_chip_up_over_the_bus() -> None:
    bus = FakeBME280Bus()
    on(bus).read()
    registers = [register for register, _ in bus.writes]
    assert (0xE0, 0xB6) in bus.writes  # soft reset
    assert 0xF2 in registers  # ctrl_hum, written before ctrl_meas as the datasheet says
    assert 0xF4 in registers
    assert registers.index(0xF2) < registers.index(0xF4)


def test_the_address_0x76() -> None:
    bus = FakeBME280Bus(address=0x76, temperature_c=19.0)
    assert on(bus).read().temperature_c == pytest.approx(19.0, abs=0.001)


def test_nothing_at_the_address_names_the_other_one() -> None:
    bus = FakeBME280Bus(address=0x76)
    sensor = BME280("weather", address=0x77, i2c=lambda _number: bus)
    with pytest.raises(SensorError, match=r"sensor weather: nothing answers at 0x77.*0x76"):
        sensor.read()


def test_a_bmp280_is_not_a_bme280() -> None:
    bus = FakeBME280Bus(chip_id=0x58)
    with pytest.raises(SensorError, match=r"sensor weather: .*not a BME280.*0x58.*BMP280"):
        on(bus).read()


def test_a_bus_error_is_a_read_error_naming_the_sensor() -> None:
    bus = FakeBME280Bus()
    sensor = on(bus, retries=1)
    assert sensor.read().temperature_c == pytest.approx(21.5, abs=0.001)
    bus.fail = True
    with pytest.raises(SensorError, match=r"sensor weather \(BME280 at 0x77\) failed 2 reads"):
        sensor.read()
    bus.fail = False  # the chip answers again: the next read sets it up again
    assert sensor.read().pressure_hpa == pytest.approx(1013.25, abs=0.01)


def test_a_bus_error_while_setting_up_is_a_read_error() -> None:
    bus = FakeBME280Bus()
    bus.fail = True
    with pytest.raises(SensorError, match="sensor weather"):
        on(bus).read()


def test_a_bus_number_that_does_not_exist_is_a_read_error() -> None:
    """Blinka and adafruit-extended-bus for real: this machine has no /dev/i2c-250."""
    pytest.importorskip("adafruit_extended_bus")
    with pytest.raises(SensorError, match=r"BME280: cannot open /dev/i2c-250 .*i2c-250"):
        BME280("weather", bus=250).read()


def test_a_board_without_i2c_is_a_read_error() -> None:
    """Blinka's `board` for real: on a machine that is not a Pi it has no usable I2C bus."""
    with pytest.raises(SensorError, match="BME280"):
        BME280("weather").read()


def test_values_outside_the_chips_range_are_read_errors() -> None:
    bus = FakeBME280Bus()
    bus.raw = (900_000, 415148, 30000)  # about 150 °C: not a BME280's reading
    with pytest.raises(SensorError, match=r"sensor weather .*temperature_c .* -40\.\.85"):
        on(bus, retries=0).read()


def test_closed_sensor_fails_and_close_twice_is_safe() -> None:
    bus = FakeBME280Bus()
    sensor = on(bus)
    sensor.read()
    sensor.close()
    sensor.close()
    assert bus.deinit_calls == 1
    with pytest.raises(SensorError, match="closed"):
        sensor.read()


@pytest.mark.parametrize("address", [0x75, 0x78, "0x75", "x", True, 1.5, None])
def test_bad_addresses(address: object) -> None:
    with pytest.raises(ConfigError, match="not a BME280 address"):
        parse_address("sensors[0].address", address)


@pytest.mark.parametrize(("text", "address"), [("0x76", 0x76), (" 0x77 ", 0x77), ("118", 0x76)])
def test_addresses_as_text(text: str, address: int) -> None:
    assert parse_address("sensors[0].address", text) == address


def test_built_from_configuration_by_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry builds it (wrapped, as every sensor, with the contract's ranges)."""
    config = SensorConfig(id="weather", kind="bme280", offset_c=-0.5, settings={"address": 0x76})
    sensor = build_sensor(config, AgentConfig(node_id="pi", w1_root=Path("/nonexistent")))
    assert isinstance(sensor, Calibrated)
    inner = sensor.sensor
    assert isinstance(inner, BME280)
    assert inner.address == 0x76
    bus = FakeBME280Bus(address=0x76, temperature_c=22.0, humidity_pct=40.0, pressure_hpa=990.0)
    monkeypatch.setattr(inner, "_i2c", lambda _number: bus)
    sample = sensor.read()
    assert sample.temperature_c == pytest.approx(21.5, abs=0.001)
    assert sample == Sample(sample.temperature_c, sample.humidity_pct, sample.pressure_hpa)
    assert REGISTRY.settings(config).integer("bus") is None


def test_without_the_library_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "adafruit_bme280", None)
    monkeypatch.setitem(sys.modules, "adafruit_bme280.basic", None)
    bus = FakeBME280Bus()
    with pytest.raises(SensorError, match=r"adafruit-circuitpython-bme280.*pi"):
        on(bus).read()
