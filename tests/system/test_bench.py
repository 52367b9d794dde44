"""The benchmarks stay runnable: their helpers measure what they claim, at a small scale.

The figures themselves are not asserted (timing belongs to bench/, not to tests); what is
checked is that the code paths the README's bench command runs still work end to end.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from bench.cpu import CpuMeter
from tests.harness.procs import REPO

pytestmark = pytest.mark.system


def test_cpu_meter_counts_a_process_tree_and_nothing_else() -> None:
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    meter = CpuMeter({"tree": [parent.pid], "idle": [idle.pid]})
    meter.start(interval=0.05)  # the child is short-lived: sample it while it lives
    parent.wait()
    totals = meter.stop()
    idle.kill()
    idle.wait()
    assert 0.5 <= totals["tree"] <= 2.0, totals
    assert totals["idle"] < 0.2, totals


def _run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bench.<module> args`` from the repository, whatever its exit code."""
    return subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _bench(module: str, *args: str) -> str:
    """Run ``python -m bench.<module> args``; its standard output, once it exited 0."""
    done = _run_bench(module, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_summary_benchmark_runs_and_checks_exactness() -> None:
    out = _bench(
        "summary",
        "--readings",
        "60000",
        "--sensors",
        "100",
        "--queries",
        "5",
        "--plain-queries",
        "2",
    )
    assert "summary equals the plain GROUP BY for all 100 sensors" in out
    assert "ours: sensor_summary_last_hour" in out
    assert "baseline: plain GROUP BY over raw rows" in out


@pytest.mark.slow
def test_cpu_meter_gives_a_child_to_its_own_group_before_its_parents() -> None:
    """A process the bench spawns and meters as its own group is not counted as the bench's,
    whichever group is named first (bench.e2e meters the bench's publishers and its consumer)."""
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    for order in (("bench", "child"), ("child", "bench")):
        child = subprocess.Popen([sys.executable, "-c", burn])
        pids = {"bench": [os.getpid()], "child": [child.pid]}
        meter = CpuMeter({name: pids[name] for name in order})
        meter.start(interval=0.05)
        child.wait()
        totals = meter.stop()
        assert 0.5 <= totals["child"] <= 2.0, (order, totals)
        assert totals["bench"] < 0.3, (order, totals)


def test_drain_benchmark_runs_ours_and_the_minimal_consumer() -> None:
    out = _bench("drain", "--readings", "3000", "--runs", "ours1,minimal,a,b", "--hostile", "0")
    assert "(d) minimal consumer: 3000 in" in out
    assert "ours x1: 3000 in" in out
    assert "ours x1 total / ((a) + (b))" in out


def test_drain_benchmark_runs_the_minimal_consumer_on_the_hostile_mix() -> None:
    """(d) on the hostile run's mix checks each message and copies the 333 unusable ones, with
    publisher confirms, before it acknowledges; it stops only when every one is copied."""
    out = _bench("drain", "--readings", "3000", "--runs", "minimal", "--hostile", "0.1")
    assert "(d) minimal consumer: 3000 in" in out
    assert "(d) 10% hostile: 3333 in" in out
    ratio = r"^\(d\) 10% hostile: [\d.]+ of \(d\) minimal consumer's clean rate$"
    assert re.search(ratio, out, re.M), out


def test_drain_benchmark_runs_two_replicas_on_the_hostile_mix_with_a_classic_dead_queue() -> None:
    """The two experiment switches: two replicas on the hostile mix (as compose runs them),
    against two on clean data, and readings.dead redeclared as a classic queue; the run ends
    only once all 333 copies are in it."""
    out = _bench("drain", "--readings", "3000", "--runs", "hostile2", "--dead-queue", "classic")
    assert "readings.dead is a classic queue for this run (an experiment)" in out
    assert "ours x2: 3000 in" in out
    assert "ours x2 10% hostile: 3333 in" in out
    ratio = r"^ours x2 10% hostile: [\d.]+ of ours x2's clean rate$"
    assert re.search(ratio, out, re.M), out


def _row(table: str, label: str) -> list[float]:
    """The leading numbers of ``label``'s row in one of a benchmark's tables (``nan`` kept, a
    ``%`` dropped), up to the first cell that is not a number."""
    for rest in re.findall(rf"^{re.escape(label)} +(\S.*)$", table, re.M):
        cells: list[float] = []
        for cell in rest.split():
            try:
                cells.append(float(cell.removesuffix("%")))
            except ValueError:
                break
        if cells:
            return cells
    raise AssertionError(f"no row {label!r} in {table}")


@pytest.mark.parametrize(
    "publishers",
    [
        pytest.param(("--client", "lite"), id="lite"),
        pytest.param(("--client", "paho", "--processes", "2"), id="paho-in-two-processes"),
    ],
)
def test_e2e_benchmark_offers_the_maximum_to_the_baselines_too(publishers: tuple[str, ...]) -> None:
    out = _bench("e2e", "--seconds", "1", *publishers)
    rates = out[out.index("offered  ") : out.index("targets:")]
    for label in ("100/s", "1,000/s", "max", "max, (d)", "baseline"):
        assert _row(rates, label)[0] > 0, (label, rates)
    assert all(math.isnan(x) for x in _row(rates, "max, (a)")[1:3]), rates  # stores nothing
    # Paced runs keep to their pace: never more than half again as fast as offered.
    assert _row(rates, "100/s")[0] <= 150, rates
    assert _row(rates, "1,000/s")[0] <= 1500, rates
    cpu = out[out.index("CPU, cores busy on average") : out.index("CPU per message")]
    per_message = out[out.index("CPU per message") :]
    for label in ("baseline", "max", "max, (d)", "max, (a)", "baseline after"):
        assert len(_row(cpu, label)) == 5, (label, cpu)
        assert len(_row(per_message, label)) == 5, (label, per_message)
    # Per message and in cores, the same CPU: at the maximum, cores busy over the rate stored.
    from_cores = _row(cpu, "max")[4] / _row(rates, "max")[0] * 1e6
    assert 0.75 <= _row(per_message, "max")[4] / from_cores <= 1.25, (from_cores, out)
    assert _row(cpu, "baseline")[0] > 0.05, cpu  # the publishers, wherever they run
    if "--processes" in publishers:
        done = re.search(
            r"^publisher processes: 2 \((.*)\), (\d+) messages published by them$", out, re.M
        )
        assert done, out
        assert done[1].count("exited 0") == 2, done[0]
        assert int(done[2]) > 0, done[0]


def test_e2e_benchmark_refuses_more_processes_than_publishers() -> None:
    done = _run_bench("e2e", "--processes", "5")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--processes: 5; give 1 to 4" in done.stderr


def test_deadletter_benchmark_prices_every_route_and_loses_nothing() -> None:
    """Each route settles every message exactly once (the bench checks the queues' counts
    and fails otherwise) and is priced against plain delivery."""
    out = _bench("deadletter", "--messages", "600", "--repeat", "1")
    table = out[out.index("Dead-lettering 600 unusable messages") :]
    assert len(_row(table, "ack")) == 3, table  # rate, broker, consumer; no "beyond" for it
    for route in ("copy", "ours", "copy-bare", "copy-mix", "nack", "nack-once"):
        rate, broker, consumer, beyond = _row(table, route)[:4]
        assert min(rate, broker, consumer) > 0, (route, table)
        share = 0.1 if route == "copy-mix" else 1.0  # one message in ten is copied there
        expected = (broker - _row(table, "ack")[1]) / share
        assert math.isclose(beyond, expected, abs_tol=1.1), (route, table)


def test_deadletter_benchmark_needs_its_baseline() -> None:
    done = _run_bench("deadletter", "--runs", "copy")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ack is the baseline and must run" in done.stderr


def test_statement_benchmark_runs_every_variant() -> None:
    """Each variant stores every reading (the benchmark checks the count), so the statement's
    parts are still where the benchmark cuts them out."""
    out = _bench("statement", "--readings", "3000", "--repeat", "1")
    for variant in (
        "ours",
        "- latest",
        "- rollups",
        "insert only",
        "ours, ON CONFLICT",
        "insert only, ON CONFLICT",
        "COPY",
        "ours, old id CHECKs",
        "COPY, old id CHECKs",
    ):
        assert re.search(rf"^{re.escape(variant)} +[\d.]+ us +[\d.]+ us +[\d.]+x$", out, re.M), (
            variant,
            out,
        )


@pytest.mark.slow
def test_partitions_benchmark_runs_every_measurement() -> None:
    out = _bench(
        "partitions",
        "--readings",
        "20000",
        "--days",
        "2",
        "--queries",
        "5",
        "--repeat",
        "1",
        "--write-readings",
        "2000",
        "--drain-readings",
        "2000",
    )
    assert "P's summary equals U's for all 200 sensors, and says it is exact" in out
    for measurement in (
        "(a) write rate",
        "(b) drain",
        "(c) summary",
        "(d) retention drop",
        "(e) migration of U",
    ):
        assert measurement in out
    assert "it did: dropped readings_p" in out


@pytest.mark.slow
def test_capacity_benchmark_connects_publishes_and_loses_nothing() -> None:
    # 50 real MQTT connections from two worker processes, each its own node user, one reading
    # a second for two seconds, through two `pipeline consume` replicas into PostgreSQL.
    out = _bench(
        "capacity",
        "--levels",
        "50",
        "--baseline",
        "0",
        "--seconds",
        "2",
        "--interval",
        "1",
        "--warmup-rounds",
        "0",
        "--settle",
        "0",
    )
    assert "50 node users by gateway/rabbitmq/users.sh" in out
    assert "50: 50/50 connected in" in out
    assert "failures: none" in out
    assert "sent 100, acked 100, rows 100, lost 0, rows without a PUBACK 0, unacked 0" in out
    assert "not sent 0, dropped connections 0" in out
    for column in ("KiB/conn", "acked/s", "vs offer", "e2e p50", "e2e p99", "lost"):
        assert column in out
    assert "sizing: " in out
    assert "dead letters after the run: 0 in readings.dead" in out
