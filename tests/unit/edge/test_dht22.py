"""DHT22: a fake device raising adafruit_dht's real RuntimeError messages, a fake clock."""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Iterator

import pytest

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors import DHT22, DHTDevice, Sample

# The messages adafruit_dht 4.x raises, verbatim.
CHECKSUM = "Checksum did not validate. Try again."
BUFFER = "A full buffer was not returned. Try again."
NOT_FOUND = "DHT sensor not found, check wiring"
UNPLAUSIBLE = "Received unplausible data. Try again."

Outcome = tuple[float | None, float | None] | Exception


class FakeClock:
    """``clock`` and ``sleep`` together: sleeping advances the time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class FakeDHT:
    """Like adafruit_dht.DHT22: reading ``temperature`` measures, ``humidity`` reuses it."""

    def __init__(self, clock: FakeClock, *outcomes: Outcome) -> None:
        self._clock = clock
        self._outcomes: Iterator[Outcome] = iter(outcomes)
        self._humidity: float | None = None
        self.read_times: list[float] = []
        self.exit_calls = 0

    @property
    def temperature(self) -> float | None:
        assert self.exit_calls == 0, "read after exit()"
        self.read_times.append(self._clock.now)
        outcome = next(self._outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        temperature, self._humidity = outcome
        return temperature

    @property
    def humidity(self) -> float | None:
        return self._humidity

    def exit(self) -> None:
        self.exit_calls += 1


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(
    clock: FakeClock, *outcomes: Outcome, retries: int = 5, retry_delay_s: float = 2.0
) -> tuple[DHT22, FakeDHT]:
    device = FakeDHT(clock, *outcomes)

    def factory(_pin: int) -> DHTDevice:
        return device

    sensor = DHT22(
        "greenhouse",
        4,
        device_factory=factory,
        retries=retries,
        retry_delay_s=retry_delay_s,
        clock=clock,
        sleep=clock.sleep,
    )
    return sensor, device


def test_reads_temperature_and_humidity(clock: FakeClock) -> None:
    sensor, _ = make(clock, (21.5, 48.2))
    assert sensor.read() == Sample(21.5, 48.2)
    assert (sensor.id, sensor.kind, sensor.pin) == ("greenhouse", "dht22", 4)
    assert clock.sleeps == []


def test_device_is_created_lazily_once(clock: FakeClock) -> None:
    pins: list[int] = []
    device = FakeDHT(clock, (20.0, 50.0), (20.1, 50.1))

    def factory(pin: int) -> DHTDevice:
        pins.append(pin)
        return device

    sensor = DHT22("t", 17, device_factory=factory, clock=clock, sleep=clock.sleep)
    assert pins == []
    sensor.read()
    sensor.read()
    assert pins == [17]


def test_never_reads_more_often_than_every_two_seconds(clock: FakeClock) -> None:
    sensor, device = make(clock, (20.0, 50.0), (20.1, 50.0), (20.2, 50.0))
    sensor.read()
    sensor.read()  # at once: waits the full interval
    clock.now += 0.5
    sensor.read()  # half a second later: waits the remainder
    assert clock.sleeps == [2.0, 1.5]
    assert device.read_times == [1000.0, 1002.0, 1004.0]


def test_no_wait_when_the_interval_has_passed(clock: FakeClock) -> None:
    sensor, _ = make(clock, (20.0, 50.0), (20.1, 50.0))
    sensor.read()
    clock.now += 60
    sensor.read()
    assert clock.sleeps == []


@pytest.mark.parametrize("message", [CHECKSUM, BUFFER, NOT_FOUND, UNPLAUSIBLE])
def test_retries_the_library_errors(clock: FakeClock, message: str) -> None:
    sensor, device = make(clock, RuntimeError(message), (22.0, 40.0))
    assert sensor.read() == Sample(22.0, 40.0)
    assert device.read_times == [1000.0, 1002.0]


@pytest.mark.parametrize("outcome", [(None, 40.0), (22.0, None)])
def test_retries_a_missing_value(clock: FakeClock, outcome: Outcome) -> None:
    sensor, _ = make(clock, outcome, (22.0, 40.0))
    assert sensor.read() == Sample(22.0, 40.0)


def test_retry_delay_longer_than_the_interval(clock: FakeClock) -> None:
    sensor, device = make(clock, RuntimeError(CHECKSUM), (22.0, 40.0), retry_delay_s=5.0)
    sensor.read()
    assert device.read_times == [1000.0, 1005.0]


def test_gives_up_with_the_last_message_and_what_to_check(clock: FakeClock) -> None:
    failures = [RuntimeError(m) for m in (CHECKSUM, BUFFER, UNPLAUSIBLE, CHECKSUM, BUFFER)]
    sensor, device = make(clock, *failures, RuntimeError(NOT_FOUND))
    with pytest.raises(SensorError) as caught:
        sensor.read()
    message = str(caught.value)
    assert "greenhouse" in message
    assert "GPIO4" in message
    assert "failed 6 reads" in message
    assert NOT_FOUND in message
    assert "BCM" in message
    assert "10 kΩ pull-up" in message
    assert "3.3 V" in message
    gaps = [b - a for a, b in itertools.pairwise(device.read_times)]
    assert gaps == [2.0] * 5


def test_interval_holds_after_a_failed_read(clock: FakeClock) -> None:
    sensor, device = make(clock, RuntimeError(CHECKSUM), (22.0, 40.0), retries=0)
    with pytest.raises(SensorError, match="Checksum did not validate"):
        sensor.read()
    assert sensor.read() == Sample(22.0, 40.0)
    assert device.read_times == [1000.0, 1002.0]


@pytest.mark.parametrize(
    ("outcome", "fragment"),
    [
        ((80.5, 50.0), "outside -40..80 °C"),
        ((-40.1, 50.0), "outside -40..80 °C"),
        ((float("nan"), 50.0), "outside -40..80 °C"),
        ((20.0, 100.1), "outside 0..100 %"),
        ((20.0, -0.1), "outside 0..100 %"),
    ],
)
def test_rejects_values_outside_the_range(
    clock: FakeClock, outcome: Outcome, fragment: str
) -> None:
    sensor, _ = make(clock, outcome)
    with pytest.raises(SensorError, match=fragment):
        sensor.read()


@pytest.mark.parametrize("outcome", [(-40.0, 0.0), (80.0, 100.0)])
def test_accepts_the_range_limits(clock: FakeClock, outcome: tuple[float, float]) -> None:
    sensor, _ = make(clock, outcome)
    assert sensor.read() == Sample(*outcome)


def test_close_releases_the_pin_once(clock: FakeClock) -> None:
    sensor, device = make(clock, (20.0, 50.0))
    sensor.read()
    sensor.close()
    sensor.close()
    assert device.exit_calls == 1
    with pytest.raises(SensorError, match="closed"):
        sensor.read()


def test_close_before_any_read_creates_no_device() -> None:
    def factory(_pin: int) -> DHTDevice:
        raise AssertionError("no device should be created")

    sensor = DHT22("t", 4, device_factory=factory)
    sensor.close()
    sensor.close()


def test_context_manager_closes(clock: FakeClock) -> None:
    sensor, device = make(clock, (20.0, 50.0))
    with sensor:
        sensor.read()
    assert device.exit_calls == 1


def test_default_factory_without_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "adafruit_dht", None)  # makes `import adafruit_dht` fail
    sensor = DHT22("t", 4)  # nothing imported yet
    with pytest.raises(SensorError) as caught:
        sensor.read()
    message = str(caught.value)
    assert "pip install 'edge-agent[pi]'" in message
    assert "libgpiod" in message


def test_default_factory_uses_the_bcm_pin_without_pulseio(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[object, bool]] = []
    clock = FakeClock()

    class LibraryDHT22(FakeDHT):
        def __init__(self, pin: object, *, use_pulseio: bool) -> None:
            super().__init__(clock, (19.5, 55.0))
            created.append((pin, use_pulseio))

    board = types.ModuleType("board")
    board.D17 = "board.D17"  # type: ignore[attr-defined]
    library = types.ModuleType("adafruit_dht")
    library.DHT22 = LibraryDHT22  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "board", board)
    monkeypatch.setitem(sys.modules, "adafruit_dht", library)

    sensor = DHT22("t", 17, clock=clock, sleep=clock.sleep)
    assert sensor.read() == Sample(19.5, 55.0)
    assert created == [("board.D17", False)]


def test_default_factory_on_a_board_without_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "board", types.ModuleType("board"))
    monkeypatch.setitem(sys.modules, "adafruit_dht", types.ModuleType("adafruit_dht"))
    with pytest.raises(SensorError, match=r"no pin D4.*BCM"):
        DHT22("t", 4).read()


@pytest.mark.parametrize(
    "settings",
    [
        {"pin": 40},
        {"pin": -1},
        {"sensor_id": "a.b"},
        {"retries": -1},
        {"min_interval_s": -1.0},
        {"retry_delay_s": float("inf")},
    ],
)
def test_constructor_validates(settings: dict[str, object]) -> None:
    arguments: dict[str, object] = {"sensor_id": "t", "pin": 4, **settings}
    with pytest.raises(ConfigError):
        DHT22(**arguments)  # type: ignore[arg-type]
