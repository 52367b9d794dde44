"""CPUTemp: gpiozero's CPUTemperature on a temp file, with gpiozero's MockFactory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors import CPUTemp, Sample


@pytest.fixture
def thermal(tmp_path: Path) -> Path:
    path = tmp_path / "temp"
    path.write_text("48312\n")
    return path


def make(path: Path) -> CPUTemp:
    return CPUTemp(sensor_file=str(path), pin_factory=MockFactory())


def test_reads_millidegrees(thermal: Path) -> None:
    sensor = make(thermal)
    assert sensor.read() == Sample(48.312)
    thermal.write_text("51000\n")
    assert sensor.read() == Sample(51.0)
    assert (sensor.id, sensor.kind) == ("cpu", "cpu")
    sensor.close()


def test_custom_id(thermal: Path) -> None:
    with CPUTemp("soc", sensor_file=str(thermal), pin_factory=MockFactory()) as sensor:
        assert sensor.id == "soc"


def test_missing_file_is_reported_on_read_not_construction(tmp_path: Path) -> None:
    sensor = make(tmp_path / "thermal_zone9" / "temp")
    with pytest.raises(SensorError) as caught:
        sensor.read()
    message = str(caught.value)
    assert "sensor cpu cannot read" in message
    assert "thermal_zone9" in message
    assert "ls /sys/class/thermal" in message
    sensor.close()


def test_file_vanishing_after_the_first_read(thermal: Path) -> None:
    sensor = make(thermal)
    sensor.read()
    thermal.unlink()
    with pytest.raises(SensorError, match="cannot read"):
        sensor.read()
    sensor.close()


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory where the file should be: reading it fails with an OSError.
    (tmp_path / "temp").mkdir()
    with pytest.raises(SensorError, match="cannot read"):
        make(tmp_path / "temp").read()


@pytest.mark.parametrize(("text", "fragment"), [("hot\n", "cannot read"), ("", "cannot read")])
def test_not_a_number(thermal: Path, text: str, fragment: str) -> None:
    sensor = make(thermal)
    sensor.read()
    thermal.write_text(text)
    with pytest.raises(SensorError, match=fragment):
        sensor.read()
    sensor.close()


@pytest.mark.parametrize("text", ["200000\n", "-41000\n", "nan\n"])
def test_out_of_range(thermal: Path, text: str) -> None:
    thermal.write_text(text)
    with pytest.raises(SensorError, match=r"outside -40\.\.125 °C"):
        make(thermal).read()


def test_close_twice_and_read_after_close(thermal: Path) -> None:
    sensor = make(thermal)
    sensor.read()
    sensor.close()
    sensor.close()
    with pytest.raises(SensorError, match="closed"):
        sensor.read()


def test_without_gpiozero(thermal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiozero", None)
    with pytest.raises(SensorError, match=r"pip install 'edge-agent\[pi\]'"):
        make(thermal).read()


def test_bad_id() -> None:
    with pytest.raises(ConfigError):
        CPUTemp("cpu/0")
