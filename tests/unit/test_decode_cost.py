"""What it costs the decoder to reject a hostile payload, relative to decoding a valid one.

A reject reason shows the offending value, clipped. Building that text with ``repr`` of the
whole value made a deeply nested array (about 900 levels fit in the 4 KiB payload limit) cost
about 80 times a valid reading to reject, because ``repr`` builds a string per level. The
reason's text is now built piece by piece and stops at the shown length.

The timing test compares within one run, as a ratio to a valid reading decoded the same way,
with the minimum of several repeats (the least disturbed run of each), and a bound far above
what is left (parsing the nesting itself, about 12x here) and far below the old cost: it
measures no absolute time, so a loaded machine slows both sides alike. The structural test
checks the same property without a clock: the formatter looks at only as much of a value as it
shows.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.decode import MAX_PAYLOAD_BYTES, decode_reading, decode_status
from pipeline.decode import _common as decode
from pipeline.errors import Rejected

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
READING_KEY = "sensors.pi-01.t1"
VALID_READING = {
    "version": 1,
    "node": "pi-01",
    "sensor": "t1",
    "kind": "simulated",
    "seq": 42,
    "ts": "2025-06-01T11:59:00.000Z",
    "temperature_c": 21.5,
}
VALID_LEGACY = {"id": "t1", "data": "2025-06-01 11:59:00", "temperatura": 21.5}
VALID_STATUS = {"version": 1, "node": "pi-01", "state": "online", "agent_version": "1.0"}

# Rejecting a nested array costs about 12x a valid reading after the fix and 75x to 175x
# before it, on a 2-core machine.
MAX_RATIO = 40


def _decode(decoder: Callable[..., object], body: bytes, key: str) -> str:
    try:
        decoder(body, key, now=NOW)
    except Rejected as exc:
        return exc.reason
    return ""


def _deepest(doc: dict[str, Any], field: str, opening: str, closing: str, key: str) -> bytes:
    """The payload with ``field`` holding the deepest nesting the JSON parser still reads."""
    template = json.dumps({**doc, field: "@"}, separators=(",", ":"))
    room = MAX_PAYLOAD_BYTES - (len(template) - len('"@"') + len("1"))
    depth = room // (len(opening) + len(closing))
    decoder = decode_status if key.startswith("status.") else decode_reading
    while depth > 0:
        body = template.replace('"@"', opening * depth + "1" + closing * depth).encode()
        if "nested too deeply" not in _decode(decoder, body, key):
            return body
        depth -= 25
    raise AssertionError("no nesting depth was parsed")


def _seconds_per_call(decoder: Callable[..., object], body: bytes, key: str, number: int) -> float:
    timer = timeit.Timer(lambda: _decode(decoder, body, key))
    return min(timer.repeat(repeat=7, number=number)) / number


@pytest.mark.parametrize(
    ("doc", "field", "key", "opening", "closing"),
    [
        (VALID_READING, "seq", READING_KEY, "[", "]"),
        (VALID_READING, "temperature_c", READING_KEY, "[1,", "]"),
        (VALID_LEGACY, "id", READING_KEY, "[", "]"),
        (VALID_STATUS, "agent_version", "status.pi-01", "[", "]"),
    ],
)
def test_rejecting_a_deeply_nested_array_costs_a_bounded_multiple_of_a_valid_reading(
    doc: dict[str, Any], field: str, key: str, opening: str, closing: str
) -> None:
    decoder = decode_status if key.startswith("status.") else decode_reading
    hostile = _deepest(doc, field, opening, closing, key)
    reason = _decode(decoder, hostile, key)
    assert reason.startswith(f"{field}: {opening}"), reason
    assert len(reason) < 200, reason
    valid = json.dumps(VALID_READING).encode()
    assert _decode(decode_reading, valid, READING_KEY) == ""
    # Interleaved, so that a burst of load hits both sides.
    ratios = []
    for _ in range(3):
        base = _seconds_per_call(decode_reading, valid, READING_KEY, 500)
        cost = _seconds_per_call(decoder, hostile, key, 20)
        ratios.append(cost / base)
    ratio = min(ratios)
    print(f"{field} nested {len(hostile)} bytes: {ratio:.1f}x a valid reading")
    assert ratio < MAX_RATIO, f"rejecting it costs {ratio:.0f}x a valid reading"


class _Counted:
    """A leaf whose ``repr`` is counted, to see how much of a value the formatter looks at."""

    calls = 0

    def __repr__(self) -> str:
        _Counted.calls += 1
        return "x"


def test_the_shown_value_is_built_from_a_bounded_part_of_the_value() -> None:
    _Counted.calls = 0
    wide = [_Counted() for _ in range(100_000)]
    shown = decode._show(wide)
    assert shown == ("[" + ", ".join(["x"] * 100))[:57] + "..."
    assert _Counted.calls <= 40, _Counted.calls  # not 100,000


def test_the_shown_value_of_a_very_deep_structure_is_clipped_without_recursion() -> None:
    deep: list[Any] = []
    for _ in range(200_000):  # far deeper than Python's recursion limit
        deep = [deep]
    shown = decode._show(deep)
    assert shown == "[" * 57 + "..."
    nested_dicts: dict[str, Any] = {}
    for _ in range(200_000):
        nested_dicts = {"a": nested_dicts}
    assert decode._show(nested_dicts) == ("{'a': " * 10)[:57] + "..."


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        -1.5,
        True,
        "it's",
        'say "hi"',
        "\x00\u202e",
        [],
        {},
        [1, [2, [3, []]], {"a": None, "b": [True, 1.5]}],
        {"'": '"', "k": {}},
        list(range(40)),
        "x" * 100,
        ["x" * 100],
        {"k" * 100: 1},
    ],
)
def test_the_shown_value_is_repr_clipped(value: object) -> None:
    text = "null" if value is None else repr(value)
    expected = text if len(text) <= 60 else text[:57] + "..."
    assert decode._show(value) == expected
