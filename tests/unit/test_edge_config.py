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
    assert config.sensors[1].settings == {"pin": 17}
    assert config.clock.require_sync
    assert config.mqtt.puback_timeout_s == 30.0  # the default


def test_puback_timeout(tmp_path: Path) -> None:
    text = GOOD.replace("[mqtt]", "[mqtt]\npuback_timeout_s = 2.5")
    assert load_config(_write(tmp_path, text), {}).mqtt.puback_timeout_s == 2.5


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
        (("[mqtt]", "[mqtt]\npuback_timeout_s = 0"), r"mqtt\.puback_timeout_s = 0 is outside"),
        (("[mqtt]", '[mqtt]\npuback_timeout_s = "soon"'), r"mqtt\.puback_timeout_s = 'soon'"),
        (("[mqtt]", "[mqtt]\npuback_timeout_s = 86400"), r"mqtt\.puback_timeout_s = 86400"),
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
    assert (sensor.id, sensor.settings["device"]) == ("kitchen", "28-0316a2b4c5ff")


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    text = GOOD.replace('password = "s3cret"', f'password_file = "{secret}"')
    assert load_config(_write(tmp_path, text), {}).mqtt.password == "from-file"


# --- secrets never leave in a repr() or an error message --------------------------------------


def test_repr_of_the_configuration_hides_the_password(tmp_path: Path) -> None:
    """A configuration printed in a log line or a traceback must not carry the password."""
    config = load_config(_write(tmp_path, GOOD), {})
    assert config.mqtt.password == "s3cret"
    for shown in (repr(config.mqtt), str(config.mqtt), repr(config), str(config)):
        assert "s3cret" not in shown
        assert "password" not in shown
    assert "pi-kitchen" in repr(config.mqtt)  # the rest is still there to debug with


def test_repr_hides_a_password_from_the_file_or_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    text = GOOD.replace('password = "s3cret"', f'password_file = "{secret}"')
    assert "from-a-file" not in repr(load_config(_write(tmp_path, text), {}))
    env = {"EDGE_MQTT_PASSWORD": "from-the-environment"}
    assert "from-the-environment" not in repr(load_config(_write(tmp_path, GOOD), env))


@pytest.mark.parametrize(
    "value", ["123456", "123456.5", "true", "[123456]", "{ pin = 123456 }", "1979-05-27"]
)
def test_a_password_of_the_wrong_type_is_named_but_never_shown(tmp_path: Path, value: str) -> None:
    """`password = 123456` is an integer in TOML: the error names the key and the type only."""
    text = GOOD.replace('password = "s3cret"', f"password = {value}")
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text), {})
    message = str(caught.value)
    assert "mqtt.password must be a string" in message
    assert "123456" not in message
    assert "1979" not in message
    assert "True" not in message


def test_an_unquoted_password_is_not_shown_in_the_toml_error(tmp_path: Path) -> None:
    text = GOOD.replace('password = "s3cret"', "password = s3cret-unquoted")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(_write(tmp_path, text), {})
    assert "s3cret" not in str(caught.value)


# --- the registry's kinds and fields ---------------------------------------------------------

BME280 = """
[[sensors]]
id = "weather"
kind = "bme280"
"""


def test_bme280_defaults_to_the_librarys_address(tmp_path: Path) -> None:
    sensor = load_config(_write(tmp_path, GOOD + BME280), {}).sensors[3]
    assert (sensor.id, sensor.kind, sensor.settings) == ("weather", "bme280", {"address": 0x77})


@pytest.mark.parametrize(
    ("line", "settings"),
    [
        ("address = 0x76", {"address": 0x76}),
        ('address = "0x76"', {"address": 0x76}),
        ("address = 119\nbus = 3", {"address": 0x77, "bus": 3}),
    ],
)
def test_bme280_fields(tmp_path: Path, line: str, settings: dict[str, int]) -> None:
    sensor = load_config(_write(tmp_path, GOOD + BME280 + line + "\n"), {}).sensors[3]
    assert sensor.settings == settings


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("address = 0x75", r"sensors\[3\]\.address = 117 is not a BME280 address"),
        ('address = "near"', r"sensors\[3\]\.address = 'near' is not a BME280 address"),
        ("bus = -1", r"sensors\[3\]\.bus = -1 is outside 0\.\.255"),
        ('bus = "one"', r"sensors\[3\]\.bus = 'one' must be an integer"),
        ("pin = 4", r"sensors\[3\]\.pin is only used by dht22 sensors"),
        ("seed = 4", r"sensors\[3\]\.seed is only used by simulated sensors"),
        ("device = 'x'", r"sensors\[3\]\.device is only used by ds18b20 sensors"),
        ("colour = 'red'", r"unknown key\(s\) in \[sensors\[3\]\]: colour"),
        ("interval_s = 0.01", r"sensors\[3\]\.interval_s = 0\.01 is outside 0\.1\.\."),
    ],
)
def test_bad_bme280_fields_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, GOOD + BME280 + line + "\n"), {})


def test_the_valid_kinds_come_from_the_registry(tmp_path: Path) -> None:
    text = GOOD.replace('kind = "cpu"', 'kind = "thermistor"')
    with pytest.raises(
        ConfigError, match=r"must be one of ds18b20, dht22, cpu, simulated, bme280$"
    ):
        load_config(_write(tmp_path, text), {})


def test_a_field_of_another_kind_names_the_kinds_that_use_it(tmp_path: Path) -> None:
    """A key no field of this kind has is refused, and the error says who uses it."""
    text = GOOD.replace('id = "cpu"\nkind = "cpu"', 'id = "cpu"\nkind = "cpu"\nhumidity = true')
    with pytest.raises(ConfigError, match=r"sensors\[2\]\.humidity is only used by simulated"):
        load_config(_write(tmp_path, text), {})


def test_dht22_keeps_its_two_second_minimum(tmp_path: Path) -> None:
    text = GOOD.replace("pin = 17", "pin = 17\ninterval_s = 1")
    with pytest.raises(ConfigError, match=r"sensors\[1\]\.interval_s = 1 is outside 2\.0\.\."):
        load_config(_write(tmp_path, text), {})


def test_simulated_fields(tmp_path: Path) -> None:
    text = (
        GOOD
        + '[[sensors]]\nid = "sim"\nkind = "simulated"\nseed = 3\nhumidity = true\n'
        + "dropout_rate = 0.25\n"
    )
    sensor = load_config(_write(tmp_path, text), {}).sensors[3]
    assert sensor.settings == {
        "seed": 3,
        "humidity": True,
        "dropout_rate": 0.25,
        "spike_rate": 0.0,
    }
