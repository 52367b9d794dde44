"""Calibrated: the offset and the running-median spike filter, on a scripted sensor."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors import Calibrated, Sample, Sensor


class Scripted:
    """A sensor that returns (or raises) what it is told, in order."""

    def __init__(self, *outcomes: Sample | Exception, kind: str = "dht22") -> None:
        self._outcomes: Iterator[Sample | Exception] = iter(outcomes)
        self._kind = kind
        self.close_calls = 0

    @property
    def id(self) -> str:
        return "t1"

    @property
    def kind(self) -> str:
        return self._kind

    def read(self) -> Sample:
        outcome = next(self._outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def close(self) -> None:
        self.close_calls += 1


def temps(*values: float) -> list[Sample]:
    return [Sample(v) for v in values]


def read_all(sensor: Sensor, count: int) -> list[Sample]:
    return [sensor.read() for _ in range(count)]


def test_passes_through_by_default() -> None:
    sensor = Calibrated(Scripted(Sample(20.0, 40.0), Sample(30.0)))
    assert read_all(sensor, 2) == [Sample(20.0, 40.0), Sample(30.0)]
    assert (sensor.id, sensor.kind) == ("t1", "dht22")


def test_offset_applies_to_temperature_only() -> None:
    sensor = Calibrated(Scripted(Sample(20.0, 40.0)), offset_c=-0.4)
    reading = sensor.read()
    assert reading.temperature_c == pytest.approx(19.6)
    assert reading.humidity_pct == 40.0


def test_median_of_three_removes_a_single_spike() -> None:
    sensor = Calibrated(Scripted(*temps(20.0, 20.2, 85.0, 20.1, 20.3)), median_window=3)
    assert [s.temperature_c for s in read_all(sensor, 5)] == [20.0, 20.1, 20.2, 20.2, 20.3]


def test_median_of_what_there_is_until_the_window_fills() -> None:
    sensor = Calibrated(Scripted(*temps(10.0, 20.0, 60.0, 30.0)), median_window=5)
    assert [s.temperature_c for s in read_all(sensor, 4)] == [10.0, 15.0, 20.0, 25.0]


def test_offset_after_the_median() -> None:
    sensor = Calibrated(Scripted(*temps(20.0, 50.0, 21.0)), offset_c=1.0, median_window=3)
    assert [s.temperature_c for s in read_all(sensor, 3)] == [21.0, 36.0, 22.0]


def test_temperature_and_humidity_are_filtered_separately() -> None:
    script = [Sample(20.0, 40.0), Sample(60.0, 41.0), Sample(21.0, 99.0), Sample(22.0, 42.0)]
    sensor = Calibrated(Scripted(*script), median_window=3)
    assert read_all(sensor, 4) == [
        Sample(20.0, 40.0),
        Sample(40.0, 40.5),
        Sample(21.0, 41.0),
        Sample(22.0, 42.0),
    ]


def test_failed_reads_do_not_enter_the_window() -> None:
    failure = SensorError("sensor t1 failed the CRC check")
    sensor = Calibrated(Scripted(Sample(20.0), failure, Sample(22.0), failure), median_window=3)
    assert sensor.read() == Sample(20.0)
    with pytest.raises(SensorError, match="CRC"):
        sensor.read()
    assert sensor.read() == Sample(21.0)  # median of 20 and 22: the failure left no trace
    with pytest.raises(SensorError):
        sensor.read()


def test_close_closes_the_wrapped_sensor() -> None:
    inner = Scripted()
    with Calibrated(inner, median_window=3) as sensor:
        assert sensor.sensor is inner
    sensor.close()
    assert inner.close_calls == 2  # the wrapper adds no state of its own to guard


@pytest.mark.parametrize("window", [0, 2, 4, 17, -3, True, 3.0])
def test_rejects_bad_windows(window: int) -> None:
    with pytest.raises(ConfigError, match="median_window"):
        Calibrated(Scripted(), median_window=window)


@pytest.mark.parametrize("window", [1, 3, 5, 15])
def test_accepts_odd_windows(window: int) -> None:
    Calibrated(Scripted(), median_window=window)


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), "0.5", True])
def test_rejects_bad_offsets(offset: float) -> None:
    with pytest.raises(ConfigError, match="offset_c"):
        Calibrated(Scripted(), offset_c=offset)


# --- the contract's ranges: a reading the pipeline would dead-letter is a read error ----------


def test_an_offset_that_pushes_past_the_kinds_range_is_a_read_error() -> None:
    """The issue's finding: 124.8 °C is a DS18B20 reading, 125.3 °C is not (-55..125)."""
    sensor = Calibrated(Scripted(Sample(124.8), kind="ds18b20"), offset_c=0.5)
    with pytest.raises(SensorError) as caught:
        sensor.read()
    message = str(caught.value)
    assert "sensor t1" in message
    assert "125.3" in message
    assert "+0.5" in message
    assert "-55..125" in message
    assert "offset_c" in message


def test_an_offset_that_stays_within_the_range_is_a_reading() -> None:
    sensor = Calibrated(Scripted(Sample(124.5), kind="ds18b20"), offset_c=0.5)
    assert sensor.read() == Sample(125.0)


def test_a_negative_offset_past_the_bottom_of_the_range_is_a_read_error() -> None:
    sensor = Calibrated(Scripted(Sample(-39.9, 50.0), kind="dht22"), offset_c=-0.5)
    with pytest.raises(SensorError, match=r"-40\.4.*-40\.\.80"):
        sensor.read()


@pytest.mark.parametrize(
    ("sample", "kind", "message"),
    [
        (Sample(20.0, 100.5), "dht22", r"humidity_pct.*100\.5.*0\.\.100"),
        (Sample(20.0, -0.1), "dht22", r"humidity_pct.*-0\.1.*0\.\.100"),
        (Sample(20.0, 50.0, 1100.2), "bme280", r"pressure_hpa.*1100\.2.*300\.\.1100"),
        (Sample(20.0, 50.0, 299.0), "bme280", r"pressure_hpa.*299.*300\.\.1100"),
        (Sample(90.0, 50.0, 1000.0), "bme280", r"temperature_c.*90.*-40\.\.85"),
        (Sample(float("nan")), "ds18b20", r"temperature_c.*nan"),
        (Sample(20.0, 50.0), "ds18b20", r"humidity_pct.*a ds18b20 measures no"),
        (Sample(20.0, None, 1000.0), "dht22", r"pressure_hpa.*a dht22 measures no"),
    ],
)
def test_every_measured_field_is_held_to_the_kinds_range(
    sample: Sample, kind: str, message: str
) -> None:
    sensor = Calibrated(Scripted(sample, kind=kind))
    with pytest.raises(SensorError, match=message):
        sensor.read()


def test_the_window_keeps_the_raw_reading_that_failed_the_range() -> None:
    """The range is checked on what would be sent; the median still sees the raw value."""
    script = [Sample(124.0), Sample(125.0), Sample(124.0)]
    sensor = Calibrated(Scripted(*script, kind="ds18b20"), offset_c=0.6, median_window=3)
    assert sensor.read().temperature_c == pytest.approx(124.6)
    with pytest.raises(SensorError, match=r"125\.1"):
        sensor.read()  # median 124.5 + 0.6 = 125.1 > 125
    assert sensor.read().temperature_c == pytest.approx(124.6)


def test_pressure_is_filtered_like_the_others() -> None:
    script = [Sample(20.0, 40.0, 1000.0), Sample(20.0, 40.0, 400.0), Sample(20.0, 40.0, 1001.0)]
    sensor = Calibrated(Scripted(*script, kind="bme280"), median_window=3)
    assert [s.pressure_hpa for s in read_all(sensor, 3)] == [1000.0, 700.0, 1000.0]
