"""DS18B20: the kernel's exact sysfs formats, written into tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors import DS18B20, Sample, discover, parse_temperature, parse_w1_slave

DEV = "28-0316a2b4c5ff"
GOOD = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
NEGATIVE = "56 ff 4b 46 7f ff 0a 10 d8 : crc=d8 YES\n56 ff 4b 46 7f ff 0a 10 d8 t=-10625\n"
SMALL_NEGATIVE = "ef ff 4b 46 7f ff 01 10 2e : crc=2e YES\nef ff 4b 46 7f ff 01 10 2e t=-1062\n"
CRC_NO = "72 01 4b 46 7f ff 0e 10 57 : crc=a3 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
ALL_ZERO = "00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t=0\n"
POWER_ON = "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n"
BUS_FAULT = "ff 07 ff ff ff ff ff ff ff : crc=ff YES\nff 07 ff ff ff ff ff ff ff t=127937\n"


class Sleeps:
    """A fake ``sleep`` that records delays and can change the sysfs tree between attempts."""

    def __init__(self, *actions: object) -> None:
        self.delays: list[float] = []
        self._actions = list(actions)

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self._actions:
            action = self._actions.pop(0)
            assert callable(action)
            action()


def device_dir(root: Path, device: str = DEV) -> Path:
    directory = root / device
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_slave(root: Path, text: str, device: str = DEV) -> Path:
    path = device_dir(root, device) / "w1_slave"
    path.write_text(text, encoding="ascii")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "devices"
    path.mkdir()
    return path


# -- parse_w1_slave: a pure function, by table ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD, 23.125),
        (NEGATIVE, -10.625),
        (SMALL_NEGATIVE, -1.062),
        (GOOD.replace("72 01 4b", "72 01 4B"), 23.125),
        (GOOD.rstrip("\n"), 23.125),
        ("50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=0\n", 0.0),
        ("91 01 4b 46 7f ff 0f 10 25 : crc=25 YES\n91 01 4b 46 7f ff 0f 10 25 t=125000\n", 125.0),
    ],
)
def test_parse_w1_slave_reads_millidegrees(text: str, expected: float) -> None:
    assert parse_w1_slave(text, DEV) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (CRC_NO, ["failed the CRC check", "crc=a3 NO", "pull-up"]),
        (ALL_ZERO, ["all-zero data", "not responding", "data line", "pull-up"]),
        (POWER_ON, ["returned 85.0 °C, the power-on value", "3.3 V on VDD, not parasite power"]),
        (BUS_FAULT, ["127.94 °C", "insufficient power or a bus fault"]),
        (
            "90 fc 4b 46 7f ff 0c 10 2b : crc=2b YES\n90 fc 4b 46 7f ff 0c 10 2b t=-56000\n",
            ["outside the DS18B20's -55..125 °C"],
        ),
        ("", ["unreadable w1_slave"]),
        ("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n", ["unreadable", "truncated"]),
        ("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=", ["unreadable"]),
        ("72 01 4b 46 7f : crc=57 YES\n72 01 4b 46 7f t=23125\n", ["unreadable"]),
        (
            "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 58 t=23125\n",
            ["unreadable"],
        ),
        (
            "72 01 4b 46 7f ff 0e 10 57 : crc=57 MAYBE\n72 01 4b 46 7f ff 0e 10 57 t=23125\n",
            ["unreadable"],
        ),
        (GOOD + GOOD, ["unreadable"]),
        ("hello\nworld\n", ["unreadable"]),
    ],
)
def test_parse_w1_slave_rejects_with_what_to_check(text: str, fragments: list[str]) -> None:
    with pytest.raises(SensorError) as caught:
        parse_w1_slave(text, DEV)
    message = str(caught.value)
    assert DEV in message
    for fragment in fragments:
        assert fragment in message


def test_parse_w1_slave_power_on_message_is_the_documented_one() -> None:
    with pytest.raises(SensorError, match=r"^sensor 28-0316a2b4c5ff returned 85\.0 °C, the power"):
        parse_w1_slave(POWER_ON, DEV)


@pytest.mark.parametrize(
    ("text", "expected"), [("23125\n", 23.125), ("-1062\n", -1.062), ("0\n", 0.0)]
)
def test_parse_temperature_attribute(text: str, expected: float) -> None:
    assert parse_temperature(text, DEV) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("85000\n", "power-on"), ("127937\n", "127.94"), ("", "unreadable"), ("23.1\n", "unreadable")],
)
def test_parse_temperature_attribute_rejects(text: str, fragment: str) -> None:
    with pytest.raises(SensorError, match=fragment):
        parse_temperature(text, DEV)


# -- discover --------------------------------------------------------------------------------


def test_discover_lists_only_ds18b20s_sorted(root: Path, tmp_path: Path) -> None:
    for name in ["28-0316a2b4c5ff", "28-00000a1b2c3d", "28-0417c1d2e3f4"]:
        device_dir(root, name)
    # Other w1_therm families, a ghost from a noisy bus, and the bus master are ignored.
    for name in ["10-000802b4c5ff", "22-000000a1b2c3", "3b-0000001a2b3c", "42-000000a1b2c3"]:
        device_dir(root, name)
    device_dir(root, "00-400000000000")
    device_dir(root, "w1_bus_master1")
    # sysfs lists devices as symlinks to their directories.
    real = tmp_path / "real-device"
    real.mkdir()
    (root / "28-0516b1c2d3e4").symlink_to(real, target_is_directory=True)

    assert discover(root) == [
        "28-00000a1b2c3d",
        "28-0316a2b4c5ff",
        "28-0417c1d2e3f4",
        "28-0516b1c2d3e4",
    ]


def test_discover_empty_bus(root: Path) -> None:
    device_dir(root, "w1_bus_master1")
    assert discover(root) == []


def test_discover_without_a_bus_says_how_to_enable_it(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="dtoverlay=w1-gpio"):
        discover(tmp_path / "missing")


# -- DS18B20.read ----------------------------------------------------------------------------


def test_read_w1_slave(root: Path) -> None:
    write_slave(root, GOOD)
    sensor = DS18B20(DEV, root=root, sleep=Sleeps())
    assert sensor.read() == Sample(23.125)
    assert (sensor.id, sensor.kind) == (DEV, "ds18b20")


def test_read_negative_temperature(root: Path) -> None:
    write_slave(root, SMALL_NEGATIVE)
    assert DS18B20(DEV, root=root, sleep=Sleeps()).read() == Sample(-1.062)


def test_read_prefers_the_temperature_attribute(root: Path) -> None:
    write_slave(root, POWER_ON)
    (device_dir(root) / "temperature").write_text("-1062\n")
    assert DS18B20(DEV, root=root, sleep=Sleeps()).read() == Sample(-1.062)


@pytest.mark.parametrize("bad", [CRC_NO, ALL_ZERO, POWER_ON])
def test_read_retries_transient_failures(root: Path, bad: str) -> None:
    write_slave(root, bad)
    sleep = Sleeps(lambda: write_slave(root, GOOD))
    assert DS18B20(DEV, root=root, sleep=sleep).read() == Sample(23.125)
    assert sleep.delays == [0.75]


def test_read_retries_power_on_value_of_the_temperature_attribute(root: Path) -> None:
    attribute = device_dir(root) / "temperature"
    attribute.write_text("85000\n")
    sleep = Sleeps(lambda: attribute.write_text("21500\n"))
    assert DS18B20(DEV, root=root, sleep=sleep).read() == Sample(21.5)


def test_read_gives_up_after_the_retries(root: Path) -> None:
    write_slave(root, CRC_NO)
    sleep = Sleeps()
    sensor = DS18B20(DEV, root=root, retries=3, retry_delay_s=0.5, sleep=sleep)
    with pytest.raises(SensorError, match=r"CRC check.*gave up after 4 attempts"):
        sensor.read()
    assert sleep.delays == [0.5, 0.5, 0.5]


def test_read_without_retries(root: Path) -> None:
    write_slave(root, ALL_ZERO)
    sleep = Sleeps()
    with pytest.raises(SensorError, match="not responding"):
        DS18B20(DEV, root=root, retries=0, sleep=sleep).read()
    assert sleep.delays == []


@pytest.mark.parametrize("text", [BUS_FAULT, "127937\n"])
def test_read_does_not_retry_a_bus_fault(root: Path, text: str) -> None:
    name = "temperature" if text.startswith("127937") else "w1_slave"
    (device_dir(root) / name).write_text(text)
    sleep = Sleeps()
    with pytest.raises(SensorError, match="insufficient power"):
        DS18B20(DEV, root=root, sleep=sleep).read()
    assert sleep.delays == []


def test_device_removed_between_discover_and_read(root: Path) -> None:
    write_slave(root, GOOD)
    (device_id,) = discover(root)
    sleep = Sleeps()
    sensor = DS18B20(device_id, root=root, sleep=sleep)
    shutil.rmtree(root / device_id)
    with pytest.raises(SensorError) as caught:
        sensor.read()
    message = str(caught.value)
    assert f"sensor {DEV} not found on the 1-Wire bus" in message
    assert f"`ls {root}`" in message
    assert sleep.delays == []


def test_missing_bus_is_mentioned(tmp_path: Path) -> None:
    sensor = DS18B20(DEV, root=tmp_path / "no-w1", sleep=Sleeps())
    with pytest.raises(SensorError, match=r"not found on the 1-Wire bus.*dtoverlay=w1-gpio"):
        sensor.read()


def test_io_error_mid_read_is_retried(root: Path) -> None:
    # A directory where the file should be: reading it raises an OSError, like the kernel's
    # EIO when the slave drops off mid-read.
    broken = device_dir(root) / "w1_slave"
    broken.mkdir()

    def repair() -> None:
        broken.rmdir()
        write_slave(root, GOOD)

    sleep = Sleeps(repair)
    assert DS18B20(DEV, root=root, sleep=sleep).read() == Sample(23.125)
    assert sleep.delays == [0.75]


def test_io_error_every_time(root: Path) -> None:
    (device_dir(root) / "w1_slave").mkdir()
    with pytest.raises(SensorError, match=r"reading .*w1_slave failed.*gave up after 2 attempts"):
        DS18B20(DEV, root=root, retries=1, sleep=Sleeps()).read()


def test_closed_sensor_refuses_to_read(root: Path) -> None:
    write_slave(root, GOOD)
    with DS18B20(DEV, root=root, sleep=Sleeps()) as sensor:
        assert sensor.read().temperature_c == 23.125
    sensor.close()
    with pytest.raises(SensorError, match="closed"):
        sensor.read()


@pytest.mark.parametrize(
    "device_id", ["10-000802b4c5ff", "28-0316A2B4C5FF", "28-0316a2b4c5", "28.0316a2b4c5ff", ""]
)
def test_constructor_rejects_non_ds18b20_ids(device_id: str) -> None:
    with pytest.raises(ConfigError):
        DS18B20(device_id)


@pytest.mark.parametrize(("retries", "delay"), [(-1, 0.75), (3, -0.1), (3, float("nan"))])
def test_constructor_rejects_bad_retry_settings(retries: int, delay: float) -> None:
    with pytest.raises(ConfigError):
        DS18B20(DEV, retries=retries, retry_delay_s=delay)
