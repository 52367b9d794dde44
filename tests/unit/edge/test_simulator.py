"""Simulated: the daily cycle, noise, drift, dropouts, spikes and humidity, all reproducible."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable

import pytest

from edge_agent.errors import ConfigError, SensorError
from edge_agent.sensors import Sample, Simulated, default_sensors
from edge_agent.sensors.simulator import daily_cycle

MIDNIGHT = 1_748_736_000.0  # 2025-06-01T00:00:00Z
HOUR = 3600.0
DAY = 86_400.0


class Clock:
    """A settable clock, in Unix seconds."""

    def __init__(self, now: float = MIDNIGHT) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def quiet(clock: Callable[[], float], **settings: object) -> Simulated:
    """A simulator without noise or drift, so readings are the bare daily cycle."""
    options: dict[str, object] = {"noise_c": 0.0, "drift_c_per_day": 0.0, **settings}
    return Simulated("sim", seed=7, clock=clock, **options)  # type: ignore[arg-type]


def readings(sensor: Simulated, clock: Clock, times: list[float]) -> list[Sample | str]:
    out: list[Sample | str] = []
    for t in times:
        clock.now = t
        try:
            out.append(sensor.read())
        except SensorError as exc:
            out.append(str(exc))
    return out


TIMES = [MIDNIGHT + i * 600.0 for i in range(300)]  # every 10 minutes for about 2 days


def test_daily_cycle_shape() -> None:
    assert daily_cycle(MIDNIGHT + 5 * HOUR) == pytest.approx(-1.0)
    assert daily_cycle(MIDNIGHT + 15 * HOUR) == pytest.approx(1.0)
    values = {h: daily_cycle(MIDNIGHT + h * HOUR) for h in range(24)}
    assert min(values, key=values.__getitem__) == 5
    assert max(values, key=values.__getitem__) == 15
    assert daily_cycle(MIDNIGHT + 3 * DAY + 7 * HOUR) == pytest.approx(values[7])
    # Continuous at midnight and at the turning points.
    for t in (MIDNIGHT, MIDNIGHT + 5 * HOUR, MIDNIGHT + 15 * HOUR):
        assert daily_cycle(t - 1) == pytest.approx(daily_cycle(t + 1), abs=1e-3)


def test_quiet_sensor_follows_the_cycle() -> None:
    clock = Clock()
    sensor = quiet(clock, base_c=20.0, amplitude_c=5.0)
    clock.now = MIDNIGHT + 5 * HOUR
    assert sensor.read().temperature_c == pytest.approx(15.0)
    clock.now = MIDNIGHT + 15 * HOUR
    assert sensor.read().temperature_c == pytest.approx(25.0)
    assert (sensor.id, sensor.kind) == ("sim", "simulated")


def test_same_seed_and_clock_give_the_same_readings() -> None:
    settings = {"humidity": True, "dropout_rate": 0.1, "spike_rate": 0.05}
    first, second = Clock(), Clock()
    a = Simulated("a", seed=42, clock=first, **settings)  # type: ignore[arg-type]
    b = Simulated("a", seed=42, clock=second, **settings)  # type: ignore[arg-type]
    assert readings(a, first, TIMES) == readings(b, second, TIMES)


def test_another_seed_gives_other_readings() -> None:
    first, second = Clock(), Clock()
    a = Simulated("a", seed=1, clock=first)
    b = Simulated("a", seed=2, clock=second)
    assert readings(a, first, TIMES[:5]) != readings(b, second, TIMES[:5])


def test_global_random_state_is_neither_used_nor_changed() -> None:
    def run(global_seed: int) -> list[Sample | str]:
        random.seed(global_seed)
        clock = Clock()
        sensor = Simulated("a", seed=3, clock=clock, spike_rate=0.2)
        state = random.getstate()
        out = readings(sensor, clock, TIMES[:50])
        assert random.getstate() == state
        return out

    assert run(1) == run(2)


def test_noise_has_the_configured_spread() -> None:
    clock = Clock(MIDNIGHT + 12 * HOUR)
    sensor = Simulated("a", seed=5, noise_c=0.5, drift_c_per_day=0.0, clock=clock)
    values = [sensor.read().temperature_c for _ in range(2000)]
    assert statistics.stdev(values) == pytest.approx(0.5, rel=0.1)
    assert statistics.mean(values) == pytest.approx(21.0 + 4.0 * daily_cycle(clock.now), abs=0.05)


def test_drift_moves_slowly_and_only_with_time() -> None:
    clock = Clock(MIDNIGHT + 12 * HOUR)
    sensor = Simulated("a", seed=9, noise_c=0.0, drift_c_per_day=0.5, clock=clock)
    start = sensor.read().temperature_c
    assert sensor.read().temperature_c == start  # no time passed: no drift
    # The same time of day, over 200 days: the cycle is equal, so the differences are drift.
    offsets = []
    for day in range(1, 201):
        clock.now = MIDNIGHT + 12 * HOUR + day * DAY
        offsets.append(sensor.read().temperature_c - start)
    steps = [abs(b - a) for a, b in itertools.pairwise(offsets)]
    assert 0.2 < statistics.mean(steps) < 0.6  # about 0.5 * sqrt(2 / pi) per day
    assert max(abs(o) for o in offsets) < 10.0  # mean-reverting: it does not wander off


def test_no_drift_when_disabled() -> None:
    clock = Clock(MIDNIGHT + 12 * HOUR)
    sensor = quiet(clock)
    first = sensor.read()
    clock.now += 30 * DAY
    assert sensor.read() == first


def test_every_read_drops_out_at_rate_one() -> None:
    clock = Clock()
    sensor = Simulated("a", seed=1, dropout_rate=1.0, clock=clock)
    with pytest.raises(SensorError, match="simulated dropout"):
        sensor.read()


def test_dropout_rate_is_respected() -> None:
    clock = Clock()
    sensor = Simulated("a", seed=1, dropout_rate=0.3, clock=clock)
    out = readings(sensor, clock, [MIDNIGHT + i for i in range(2000)])
    dropped = sum(isinstance(r, str) for r in out)
    assert 0.25 < dropped / len(out) < 0.35
    assert all("sensor a: simulated dropout" in r for r in out if isinstance(r, str))


def test_spikes_are_8_to_20_degrees_either_way() -> None:
    clock = Clock(MIDNIGHT + 5 * HOUR)
    sensor = quiet(clock, base_c=20.0, amplitude_c=0.0, spike_rate=1.0)
    deltas = [sensor.read().temperature_c - 20.0 for _ in range(500)]
    assert all(8.0 <= abs(d) <= 20.0 for d in deltas)
    assert any(d > 0 for d in deltas)
    assert any(d < 0 for d in deltas)


def test_spikes_last_one_reading() -> None:
    clock = Clock(MIDNIGHT + 5 * HOUR)
    sensor = quiet(clock, base_c=20.0, amplitude_c=0.0, spike_rate=0.1)
    values = [sensor.read().temperature_c for _ in range(1000)]
    spiked = [abs(v - 20.0) >= 8.0 for v in values]
    assert 0.05 < sum(spiked) / len(values) < 0.15
    assert all(abs(v - 20.0) < 1e-9 for v, s in zip(values, spiked, strict=True) if not s)


def test_no_humidity_unless_asked() -> None:
    sensor = Simulated("a", seed=1, clock=Clock())
    assert sensor.read().humidity_pct is None
    assert not sensor.has_humidity


def test_humidity_is_anti_correlated_and_in_range() -> None:
    clock = Clock()
    sensor = Simulated("a", seed=1, humidity=True, clock=clock)
    samples = [s for s in readings(sensor, clock, TIMES) if isinstance(s, Sample)]
    temperatures = [s.temperature_c for s in samples]
    humidities = [s.humidity_pct for s in samples]
    assert all(h is not None and 0.0 <= h <= 100.0 for h in humidities)
    assert statistics.correlation(temperatures, humidities) < -0.8  # type: ignore[arg-type]


def test_humidity_is_clamped() -> None:
    clock = Clock()
    sensor = quiet(clock, amplitude_c=40.0, humidity=True)
    values = [s.humidity_pct for s in readings(sensor, clock, TIMES) if isinstance(s, Sample)]
    assert min(v for v in values if v is not None) == 0.0
    assert max(v for v in values if v is not None) == 100.0


def test_default_sensors() -> None:
    clock = Clock()
    sensors = default_sensors(seed=1, clock=clock)
    assert [s.id for s in sensors] == ["sim-1", "sim-2", "sim-3"]
    assert {s.kind for s in sensors} == {"simulated"}
    assert [s.has_humidity for s in sensors] == [False, False, True]

    def swing(sensor: Simulated) -> tuple[float, float]:
        clock.now = MIDNIGHT + 5 * HOUR
        low = sensor.read().temperature_c
        clock.now = MIDNIGHT + 15 * HOUR
        high = sensor.read().temperature_c
        return low, high

    indoor_low, indoor_high = swing(sensors[0])
    outdoor_low, outdoor_high = swing(sensors[1])
    assert outdoor_high - outdoor_low > indoor_high - indoor_low  # larger amplitude
    assert outdoor_low + outdoor_high < indoor_low + indoor_high  # lower base
    humidity = sensors[2].read().humidity_pct
    assert humidity is not None
    assert math.isfinite(humidity)


def test_default_sensors_are_reproducible_and_distinct() -> None:
    def run(seed: int) -> list[list[Sample | str]]:
        clock = Clock()
        return [readings(s, clock, TIMES[:3]) for s in default_sensors(seed, clock=clock)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_closed_sensor_refuses_to_read() -> None:
    sensor = Simulated("a", seed=1, clock=Clock())
    sensor.close()
    sensor.close()
    with pytest.raises(SensorError, match="closed"):
        sensor.read()


@pytest.mark.parametrize(
    "settings",
    [
        {"sensor_id": "sim 1"},
        {"seed": 1.5},
        {"noise_c": -0.1},
        {"amplitude_c": float("nan")},
        {"base_c": float("inf")},
        {"dropout_rate": 1.1},
        {"spike_rate": -0.1},
        {"drift_c_per_day": "0.5"},
    ],
)
def test_constructor_validates(settings: dict[str, object]) -> None:
    arguments: dict[str, object] = {"sensor_id": "a", "seed": 1, **settings}
    with pytest.raises(ConfigError):
        Simulated(**arguments)  # type: ignore[arg-type]
