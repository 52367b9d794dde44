"""Where a new outbox starts counting: never where another card of the same node did.

``(node, sensor, seq)`` is a reading's key in the pipeline; a second reading under a key it
already has is taken for a duplicate and dropped. A new outbox used to start at the time in
microseconds whether or not the clock was synchronised, so two cards flashed from one image,
both booting with the image's (restored, wrong) time, reused each other's keys (issue 13,
item 3). Now an unsynchronised clock seeds from a random point above every time-based start.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, OutboxConfig, SensorConfig
from edge_agent.outbox import RANDOM_SEED_RANGE, Outbox
from tests.unit.edge.agents import sequence_counter
from tests.unit.edge.fake_clock import FakeClock

IMAGE_TIME = 1_700_000_000.0  # the time saved in the SD card image both cards were flashed from


def _add(box: Outbox) -> int:
    return box.add(
        sensor="t1",
        kind="simulated",
        temperature_c=21.5,
        humidity_pct=None,
        wall=IMAGE_TIME,
        boot_id="b",
        boottime=1.0,
        synced=False,
    )


def test_two_cards_from_one_image_never_share_sequence_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both cards boot with the image's time, unsynchronised, and create their outbox."""
    monkeypatch.setattr(time, "time", lambda: IMAGE_TIME)
    firsts = []
    for card in ("card-a", "card-b"):
        config = AgentConfig(
            node_id="pi-kitchen",
            outbox=OutboxConfig(path=tmp_path / card / "outbox.sqlite"),
            sensors=(SensorConfig(id="t1", kind="simulated"),),
        )
        agent = Agent(config, sensors=[], clock=FakeClock(synced=False, wall=IMAGE_TIME))
        firsts.append(_add(agent.outbox))
        agent.outbox.close()
    low, high = RANDOM_SEED_RANGE
    assert firsts[0] != firsts[1]
    assert all(low < first <= high for first in firsts), firsts
    # Far enough apart that neither card reaches the other's numbers in a lifetime.
    assert abs(firsts[0] - firsts[1]) > 2**40


def test_an_unsynchronised_clock_seeds_at_random_above_any_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.outbox")
    seeds = []
    for n in range(5):
        with Outbox(tmp_path / f"o{n}.sqlite", clock_synced=False) as box:
            seeds.append(sequence_counter(box.path))
            assert _add(box) == seeds[-1] + 1
    low, high = RANDOM_SEED_RANGE
    assert (low, high) == (2**62, 2**63 - 2**40)
    assert len(set(seeds)) == 5
    assert all(low <= seed < high for seed in seeds)
    assert caplog.text.count("seeded_from=random (clock not synchronised)") == 5


def test_a_synchronised_clock_seeds_from_the_time_in_microseconds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.outbox")
    before = int(time.time() * 1_000_000)
    with Outbox(tmp_path / "o.sqlite", clock_synced=True) as box:
        after = int(time.time() * 1_000_000)
        seed = sequence_counter(box.path)
        assert before <= seed <= after
        assert _add(box) == seed + 1
    assert "seeded_from=the synchronised clock (microseconds)" in caplog.text


@pytest.mark.parametrize("synced_then", [True, False])
def test_an_existing_outbox_is_never_seeded_again(tmp_path: Path, synced_then: bool) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path, clock_synced=synced_then) as box:
        seeded = sequence_counter(path)
    for synced_now in (True, False):
        with Outbox(path, clock_synced=synced_now) as box:
            assert sequence_counter(path) == seeded, "an empty outbox was seeded again"
    with Outbox(path, clock_synced=synced_then) as box:
        taken = [_add(box) for _ in range(3)]
        box.delete(taken)
    for synced_now in (not synced_then, synced_then):
        with Outbox(path, clock_synced=synced_now) as box:
            later = _add(box)
            assert later > max(taken)
            taken.append(later)
    assert taken == list(range(seeded + 1, seeded + 6))
