"""Sampling: a failing sensor fails alone, its errors are counted, the others go on."""

from __future__ import annotations

import threading
from pathlib import Path

from edge_agent.agent import _Counters, _Sampler
from edge_agent.clock import KernelClock
from edge_agent.errors import SensorError
from edge_agent.outbox import Outbox
from edge_agent.sensors import Sample, Simulated


class _Broken:
    id = "broken"
    kind = "ds18b20"

    def __init__(self) -> None:
        self.calls = 0

    def read(self) -> Sample:
        self.calls += 1
        raise SensorError("sensor broken returned 85.0 °C, the power-on value")

    def close(self) -> None:
        pass


class _Buggy(_Broken):
    id = "buggy"

    def read(self) -> Sample:
        raise ZeroDivisionError("a driver bug")


def test_failing_sensors_fail_alone(tmp_path: Path) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    sensors = [_Broken(), _Buggy(), Simulated("sim-1", seed=1)]
    counters = _Counters(read_errors={s.id: 0 for s in sensors})
    with Outbox(tmp_path / "o.sqlite") as box:
        samplers = [
            _Sampler(
                s,
                0.01,
                outbox=box,
                clock=KernelClock(assume_synced=True),
                counters=counters,
                lock=lock,
                stop=stop,
            )
            for s in sensors
        ]
        for sampler in samplers:
            sampler.start()
        stop.wait(0.5)
        stop.set()
        for sampler in samplers:
            sampler.join(5)
        stored = box.pending(0, 10_000)
    assert counters.read_errors["broken"] >= 10
    assert counters.read_errors["buggy"] >= 10
    assert counters.read_errors["sim-1"] == 0
    assert len(stored) == counters.readings >= 10
    assert {r.sensor for r in stored} == {"sim-1"}
    assert all(not t.is_alive() for t in samplers)
