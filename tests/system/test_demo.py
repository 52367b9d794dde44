"""The native demo starts, fills the summary and stops cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness.procs import REPO

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_native_demo_fills_the_summary_and_stops_cleanly() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.demo", "--duration", "12", "--every", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    assert "stopped cleanly" in done.stdout
    final = done.stdout.split("stopping:")[1]
    rows = [line.split() for line in final.splitlines() if line.startswith("demo-")]
    assert {(r[0], r[1]) for r in rows} == {
        (f"demo-{n}", f"sim-{s}") for n in (1, 2, 3) for s in (1, 2, 3)
    }
    assert all(int(r[3]) >= 5 for r in rows)
    humid = [r for r in rows if r[1] == "sim-3"]
    assert all(r[7] != "-" for r in humid)  # the third sensor reports humidity
