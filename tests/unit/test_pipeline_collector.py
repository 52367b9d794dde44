"""The consumer process's garbage-collector tuning (pipeline.consumer.tune_collector).

It freezes process-wide state, so each case runs in a fresh interpreter, never in pytest's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from pipeline.consumer import GC_THRESHOLDS

_PROBE = textwrap.dedent(
    """
    import gc, json, sys, weakref
    import pipeline.consumer as consumer

    tuned = sys.argv[1] == "tuned"
    if tuned:
        consumer.tune_collector()
    young = []
    gc.callbacks.append(
        lambda phase, info: young.append(info["generation"]) if phase == "stop" else None
    )

    class Node:
        pass

    # What a drain does to the collector: containers that live for a batch (a tuple, a list
    # and a dict per message here, 1,000 messages a batch), then are freed by reference
    # counting. Only containers still alive count towards a collection.
    for start in range(0, 100_000, 1_000):
        batch = [(i, [i], {"i": i}) for i in range(start, start + 1_000)]
    del batch
    collections = len(young)

    # Cyclic garbage is still found: a cycle dropped, then enough allocations to trigger
    # a young collection at the tuned threshold.
    freed = []
    a, b = Node(), Node()
    a.other, b.other = b, a
    weakref.finalize(a, freed.append, True)
    del a, b
    kept = [[i] for i in range(3 * gc.get_threshold()[0])]
    print(json.dumps({
        "threshold": gc.get_threshold(),
        "frozen": gc.get_freeze_count(),
        "collections": collections,
        "cycle_freed": bool(freed),
    }))
    """
)


def _probe(mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_tuning_freezes_start_up_and_collects_far_less_often() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    assert default["frozen"] == 0
    # The imports' objects (pika, SQLAlchemy, psycopg, prometheus_client) are frozen.
    assert tuned["frozen"] > 10_000
    assert tuned["threshold"] == list(GC_THRESHOLDS)
    # 400,000 containers, 4,000 alive at a time: hundreds of collections with Python's 700,
    # a handful at most now.
    assert default["collections"] > 200
    assert tuned["collections"] <= 8


def test_cyclic_garbage_is_still_collected_after_tuning() -> None:
    assert _probe("tuned")["cycle_freed"] is True
    assert _probe("default")["cycle_freed"] is True
