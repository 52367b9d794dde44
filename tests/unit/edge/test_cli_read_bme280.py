"""`edge-agent read` with a BME280: the real library on the fake bus, pressure printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.sensors import bme280
from edge_agent.sensors.fakes import FakeBME280Bus

pytest.importorskip("adafruit_bme280")


def test_read_prints_temperature_humidity_and_pressure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    buses: list[int | None] = []

    def fake_bus(number: int | None) -> FakeBME280Bus:
        buses.append(number)
        return FakeBME280Bus(
            address=0x76, temperature_c=19.5, humidity_pct=52.0, pressure_hpa=1001.75
        )

    monkeypatch.setattr(bme280, "_i2c_bus", fake_bus)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[node]\nid = "pi-test"\n[outbox]\npath = "{tmp_path / "o.sqlite"}"\n'
        '[[sensors]]\nid = "weather"\nkind = "bme280"\naddress = 0x76\nbus = 1\n'
    )
    assert main(["read", "--config", str(config)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split() == ["weather", "bme280", "19.50", "°C", "52.0", "%RH", "1001.75", "hPa"]
    assert buses == [1]
