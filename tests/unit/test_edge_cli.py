"""`edge-agent read`, `detect` and `status` against a faked 1-Wire bus and a real outbox."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.outbox import Outbox

W1_SLAVE = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
POWER_ON = "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n"


def _bus(tmp_path: Path, devices: dict[str, str]) -> Path:
    root = tmp_path / "w1"
    for device, text in devices.items():
        (root / device).mkdir(parents=True)
        (root / device / "w1_slave").write_text(text)
    (root / "w1_bus_master1").mkdir(parents=True)
    return root


def _config(tmp_path: Path, root: Path, devices: list[str]) -> Path:
    lines = [
        "[node]",
        'id = "pi-test"',
        "[outbox]",
        f'path = "{tmp_path / "outbox.sqlite"}"',
        "[agent]",
        f'w1_root = "{root}"',
    ]
    for n, device in enumerate(devices):
        lines += ["[[sensors]]", f'id = "probe-{n}"', 'kind = "ds18b20"', f'device = "{device}"']
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_detect_lists_ds18b20_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _bus(tmp_path, {"28-0316a2b4c5ff": W1_SLAVE, "28-000005e2fdc3": W1_SLAVE})
    assert main(["detect", "--w1-root", str(root)]) == 0
    assert capsys.readouterr().out.split() == ["28-000005e2fdc3", "28-0316a2b4c5ff"]


def test_detect_explains_an_empty_or_missing_bus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["detect", "--w1-root", str(tmp_path / "none")]) == 1
    assert "dtoverlay=w1-gpio" in capsys.readouterr().out
    assert main(["detect", "--w1-root", str(_bus(tmp_path, {}))]) == 1
    assert "pull-up" in capsys.readouterr().out


def test_read_prints_each_sensor_and_fails_on_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _bus(tmp_path, {"28-0316a2b4c5ff": W1_SLAVE, "28-000005e2fdc3": POWER_ON})
    config = _config(tmp_path, root, ["28-0316a2b4c5ff", "28-000005e2fdc3"])
    assert main(["read", "--config", str(config)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["probe-0", "ds18b20", "23.12"]
    assert "ERROR" in out[1]
    assert "85" in out[1]


def test_status_reports_the_outbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, _bus(tmp_path, {}), ["28-0316a2b4c5ff"])
    with Outbox(tmp_path / "outbox.sqlite") as box:
        for _ in range(3):
            box.add(
                sensor="probe-0",
                kind="ds18b20",
                temperature_c=20.0,
                humidity_pct=None,
                wall=1_800_000_000.0,
                boot_id="b",
                boottime=1.0,
                synced=True,
            )
    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["outbox_depth"] == 3
    assert status["node"] == "pi-test"
    assert status["last_publish_acknowledged"] is None


def test_configuration_errors_exit_2_and_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nid = "a.b"\n')
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "read", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "node.id = 'a.b'" in done.stderr
