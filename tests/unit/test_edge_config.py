"""Edge configuration: one TOML file plus environment, every error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError

GOOD = """
[node]
id = "pi-kitchen"

[mqtt]
host = "gateway.local"
password = "s3cret"

[outbox]
path = "{outbox}"
drain_rate_per_s = 50

[[sensors]]
id = "28-0316a2b4c5ff"
kind = "ds18b20"
interval_s = 30
offset_c = -0.25

[[sensors]]
id = "porch"
kind = "dht22"
pin = 17
median_window = 5

[[sensors]]
id = "cpu"
kind = "cpu"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text.replace("{outbox}", str(tmp_path / "outbox.sqlite")))
    return path


def test_full_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD), {})
    assert config.node_id == "pi-kitchen"
    assert config.mqtt.host == "gateway.local"
    assert config.mqtt.port == 1883
    assert config.mqtt.username == "pi-kitchen"  # defaults to the node id
    assert config.outbox.drain_rate_per_s == 50
    assert [s.kind for s in config.sensors] == ["ds18b20", "dht22", "cpu"]
    assert config.sensors[0].offset_c == -0.25
    assert config.sensors[1].pin == 17
    assert config.clock.require_sync


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {"EDGE_MQTT_HOST": "10.0.0.2", "EDGE_MQTT_PORT": "1884", "EDGE_NODE_ID": "pi-2"}
    config = load_config(_write(tmp_path, GOOD), env)
    assert (config.mqtt.host, config.mqtt.port, config.node_id) == ("10.0.0.2", 1884, "pi-2")


def test_simulate_needs_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    config = load_config(None, {}, simulate=True)
    assert [s.id for s in config.sensors] == ["sim-1", "sim-2", "sim-3"]
    assert config.mqtt.host == "localhost"
    assert config.outbox.path == tmp_path / "edge-agent" / "outbox.sqlite"
    assert not config.clock.require_sync


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found.*--simulate"):
        load_config(tmp_path / "nope.toml", {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('id = "pi-kitchen"', 'id = "pi.kitchen"'), r"node\.id = 'pi\.kitchen' is not a valid id"),
        (("drain_rate_per_s = 50", "drain_rate_per_s = 0"), r"outbox\.drain_rate_per_s = 0"),
        (("drain_rate_per_s = 50", 'drain_rate_per_s = "x"'), r"outbox\.drain_rate_per_s"),
        (("interval_s = 30", "interval_s = true"), r"sensors\[0\]\.interval_s = True"),
        (('kind = "cpu"', 'kind = "thermistor"'), r"sensors\[2\]\.kind = 'thermistor'"),
        (("pin = 17", ""), r"sensors\[1\]\.pin is required"),
        (('id = "28-0316a2b4c5ff"', 'id = "kitchen"'), r"sensors\[0\]\.device = 'kitchen'"),
        (("median_window = 5", "median_window = 4"), r"median_window = 4 must be odd"),
        (('host = "gateway.local"', 'hots = "x"'), r"unknown key\(s\) in \[mqtt\]: hots"),
        (('id = "cpu"', 'id = "porch"'), r"id 'porch' is used twice"),
        (("[mqtt]", "[mqtt]\nca_file = '/nonexistent/ca.pem'"), r"mqtt\.ca_file .* does not"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, GOOD.replace(*change)), {})


def test_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.port = 'eighty'"):
        load_config(_write(tmp_path, GOOD), {"EDGE_MQTT_PORT": "eighty"})


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[node\nid="), {})


def test_ds18b20_with_a_friendly_name(tmp_path: Path) -> None:
    text = GOOD.replace('id = "28-0316a2b4c5ff"', 'id = "kitchen"\ndevice = "28-0316a2b4c5ff"')
    sensor = load_config(_write(tmp_path, text), {}).sensors[0]
    assert (sensor.id, sensor.device) == ("kitchen", "28-0316a2b4c5ff")


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    text = GOOD.replace('password = "s3cret"', f'password_file = "{secret}"')
    assert load_config(_write(tmp_path, text), {}).mqtt.password == "from-file"
