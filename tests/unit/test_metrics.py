"""pipeline.metrics: the periodic stats line counts every batch exactly once.

The writer thread adds to the counters (on_batch) while the AMQP thread logs and zeroes them
(maybe_log); an addition that landed between the read and the zeroing used to be lost.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterator

import pytest

from pipeline.metrics import Metrics

_FIELDS = ("consumed", "inserted", "duplicates", "conflicts", "rejected", "statuses", "batches")
_VALUE = re.compile(r"\b(" + "|".join(_FIELDS) + r")=(\d+)\b")


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Threads switch every microsecond, so a window of a few bytecodes is hit often."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _sums(records: list[logging.LogRecord]) -> dict[str, int]:
    sums = dict.fromkeys(_FIELDS, 0)
    for record in records:
        for name, value in _VALUE.findall(record.getMessage()):
            sums[name] += int(value)
    return sums


@pytest.mark.usefixtures("fast_switching")
def test_stats_lines_add_up_to_every_update(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(interval_s=3600)
    batches = 20_000

    def writer() -> None:
        for _ in range(batches):
            metrics.on_batch(10, 7, 2, 1, 0.001)

    caplog.set_level(logging.INFO, logger="pipeline.stats")
    thread = threading.Thread(target=writer)
    thread.start()
    consumed = 0
    while thread.is_alive():
        metrics.on_consumed("readings", 3)  # the AMQP thread's own counters, meanwhile
        metrics.on_rejected("readings")
        consumed += 3
        metrics.maybe_log(force=True)
    thread.join()
    metrics.maybe_log(force=True)
    lines = [r for r in caplog.records if r.name == "pipeline.stats"]
    print(f"stats lines={len(lines)}")
    assert len(lines) > 10, "the race was not exercised: too few stats lines"
    sums = _sums(lines)
    del sums["conflicts"]
    assert sums == {
        "consumed": consumed,
        "inserted": 7 * batches,
        "duplicates": 2 * batches,
        "rejected": consumed // 3,
        "statuses": batches,
        "batches": batches,
    }


def test_stats_line_names_conflicts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.stats")
    metrics = Metrics(interval_s=60)
    metrics.on_batch(5, 2, 1, 0, 0.002, conflicts=2)
    metrics.maybe_log(force=True)
    (line,) = (r.getMessage() for r in caplog.records if r.name == "pipeline.stats")
    assert "inserted=2 duplicates=1 conflicts=2 " in line
    assert "batches=1 commit_ms_mean=2.0" in line
    metrics.maybe_log(force=True)  # the counters were zeroed
    assert "inserted=0 duplicates=0 conflicts=0 " in caplog.records[-1].getMessage()


def test_conflicts_are_a_prometheus_counter() -> None:
    from prometheus_client import REGISTRY  # noqa: PLC0415

    before = REGISTRY.get_sample_value("pipeline_readings_conflicting_total") or 0.0
    Metrics(interval_s=60).on_batch(3, 0, 0, 0, 0.001, conflicts=3)
    assert REGISTRY.get_sample_value("pipeline_readings_conflicting_total") == before + 3
