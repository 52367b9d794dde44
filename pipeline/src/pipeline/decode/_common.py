"""What every message kind's decoder shares: loading a payload, showing a value, field checks.

Every function here either returns a value that is safe to use or raises
:class:`~pipeline.errors.Rejected`, whose ``reason`` names the field and the offending value
(clipped, and escaped by ``repr``, so a hostile payload cannot flood a log line or an AMQP
header).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, NoReturn

from pipeline.errors import Rejected
from tempmon_contract.ids import ID, ID_RULE, sensor_of_routing_key
from tempmon_contract.wire import MAX_PAYLOAD_BYTES, VERSION

_MAX_FUTURE: Final = timedelta(seconds=300)
_EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)
_SHOW_MAX: Final = 60

# RFC 3339 date-time, shape only (fromisoformat checks the calendar). [0-9], not \d: \d would
# accept other scripts' digits.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)
_UTC_SUFFIXES: Final = frozenset({"Z", "+00:00"})


# --- reasons -----------------------------------------------------------------------------------


def _show(value: object) -> str:
    """``repr`` of a value, clipped to ``_SHOW_MAX`` characters: the value comes from the network.

    The text is built piece by piece (:func:`_pieces`) and building stops as soon as it is
    longer than what is shown, so the cost is bounded by ``_SHOW_MAX`` and not by the value:
    ``repr`` of an array nested a thousand levels deep (which fits in the 4 KiB payload limit)
    builds a string per level, quadratic in the depth, and cost about 80 times a valid
    reading's decode, only to be clipped to 60 characters. Nothing recurses, so no depth can
    raise ``RecursionError``. For values that fit, the text is exactly ``repr``'s (``null``
    for None at the top level).
    """
    if value is None:
        return "null"
    pieces: list[str] = []
    length = 0
    for piece in _pieces(value, _SHOW_MAX + 1):
        pieces.append(piece)
        length += len(piece)
        if length > _SHOW_MAX:
            break  # the rest of the value is never looked at
    shown = "".join(pieces)
    if length > _SHOW_MAX:
        return shown[: _SHOW_MAX - 3] + "..."
    return shown


def _pieces(value: object, limit: int) -> Iterator[str]:
    """``repr``'s text of a JSON value, in pieces, lazily and without recursion."""
    # Open containers, innermost last: (entries left, closing bracket, is a dict).
    frames: list[tuple[Iterator[Any], str, bool]] = []
    item: object = value
    while True:
        if type(item) is list:
            yield "["
            frames.append((iter(item), "]", False))
            first = True
        elif type(item) is dict:
            yield "{"
            frames.append((iter(item.items()), "}", True))
            first = True
        else:
            yield _show_scalar(item, limit)
            first = False
        while True:  # the next entry of the innermost open container, closing finished ones
            if not frames:
                return
            entries, closing, is_dict = frames[-1]
            entry: Any = next(entries, _NO_ENTRY)
            if entry is not _NO_ENTRY:
                break
            frames.pop()
            yield closing
            first = False
        if not first:
            yield ", "
        if is_dict:
            key, item = entry
            yield _show_scalar(key, limit) + ": "
        else:
            item = entry


_NO_ENTRY: Final = object()


def _show_scalar(value: object, limit: int) -> str:
    """``repr`` of a value that is not a list or dict, for :func:`_show`; at most a few times
    ``limit`` characters for a string (only its first ``limit`` characters are looked at).

    A longer string's text may choose its quotes differently from ``repr`` of the whole
    string (the prefix may lack the quote that made ``repr`` switch); it is clipped anyway.
    """
    if type(value) is str and len(value) > limit:
        return repr(value[:limit])
    # int, float, bool, None and short strings: JSON limits an integer literal to 4300
    # digits and the payload to 4 KiB, so this is bounded too.
    return repr(value)


def _bounds(low: float, high: float) -> str:
    """A range as a reason shows it: ``-55..125`` (``:g``, so an integral float shows as an int)."""
    return f"{low:g}..{high:g}"


_TYPE_NAMES: Final[Mapping[type, str]] = MappingProxyType(
    {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
)
_JSON_NAMES: Final[Mapping[type, str]] = MappingProxyType(
    {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
)


def _wrong_type(field: str, value: object, expected: str) -> Rejected:
    if value is None:
        return Rejected(f"{field}: null, expected {expected}")
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return Rejected(f"{field}: {_show(value)} is {kind}, expected {expected}")


def _missing(field: str) -> Rejected:
    return Rejected(f"{field}: missing")


def _unknown_fields(obj: Mapping[str, object], allowed: frozenset[str], what: str) -> Rejected:
    unknown = [key for key in obj if key not in allowed]
    shown = ", ".join(_show(key) for key in unknown[:3])
    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
    noun = "field" if len(unknown) == 1 else "fields"
    return Rejected(
        f"payload: unknown {noun} {shown}{more} ({what} allows only {', '.join(sorted(allowed))})"
    )


# --- JSON --------------------------------------------------------------------------------------


def _reject_constant(token: str) -> NoReturn:
    raise Rejected(f"payload: {token} is not JSON (send a finite number, or leave the field out)")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Rejected(f"payload: key {_show(key)} appears more than once")
            seen.add(key)
    return obj


# One decoder, built once: json.loads with keyword arguments builds a new one per call, which
# costs more than the parse. It keeps no state between calls.
_JSON: Final = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _load_object(body: bytes) -> dict[str, object]:
    """Size, UTF-8, JSON, object: in that order, so an oversize payload is never parsed."""
    size = len(body)
    if size > MAX_PAYLOAD_BYTES:
        raise Rejected(f"payload: {size} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            f"payload: not UTF-8 JSON (invalid UTF-8 at byte {exc.start}: {exc.reason})"
        ) from None
    try:
        value: object = _JSON.decode(text)
    except Rejected:
        raise
    except json.JSONDecodeError as exc:
        raise Rejected(
            f"payload: not UTF-8 JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise Rejected("payload: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than int() converts
        raise Rejected(f"payload: not usable JSON ({str(exc)[:_SHOW_MAX]})") from None
    if type(value) is not dict:
        kind = "null" if value is None else _JSON_NAMES.get(type(value), "value")
        raise Rejected(f"payload: JSON {kind}, expected an object")
    return value


# --- fields ------------------------------------------------------------------------------------


def _check_version(obj: Mapping[str, object]) -> None:
    try:
        value = obj["version"]
    except KeyError:
        raise _missing("version") from None
    if type(value) is not int:
        raise _wrong_type("version", value, "the integer 1")
    if value != VERSION:
        raise Rejected(f"version: {_show(value)} is not supported (this pipeline reads version 1)")


def _id(value: object, field: str) -> str:
    if type(value) is not str:
        raise _wrong_type(field, value, f"a string of {ID_RULE}")
    if ID.fullmatch(value) is None:
        raise Rejected(f"{field}: {_show(value)} is not an id ({ID_RULE})")
    return value


def _integer(value: object, field: str, maximum: int) -> int:
    if type(value) is not int:
        raise _wrong_type(field, value, "an integer")
    if not 0 <= value <= maximum:
        raise Rejected(f"{field}: {_show(value)} is outside 0..{maximum}")
    return value


def _number(value: object, field: str) -> float | int:
    if type(value) is not float and type(value) is not int:
        raise _wrong_type(field, value, "a number")
    return value


def _bounded_time(ts: datetime, text: str, field: str, now: datetime) -> datetime:
    ahead = ts - now
    if ahead > _MAX_FUTURE:
        raise Rejected(
            f"{field}: {_show(text)} is {int(ahead.total_seconds())} s in the future (clock wrong?)"
        )
    if ts < _EARLIEST:
        raise Rejected(
            f"{field}: {_show(text)} is before 2000-01-01 (the node's clock was never set?)"
        )
    return ts


def _utc_time(value: object, field: str, now: datetime) -> datetime:
    if type(value) is not str:
        raise _wrong_type(field, value, "an RFC 3339 UTC time like '2025-06-01T12:00:00Z'")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise Rejected(
            f"{field}: {_show(value)} is not an RFC 3339 time like '2025-06-01T12:00:00.000Z'"
        )
    if match.group(1) not in _UTC_SUFFIXES:
        raise Rejected(f"{field}: {_show(value)} must be UTC (end in Z or +00:00)")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError as exc:
        raise Rejected(f"{field}: {_show(value)} is not a valid time ({exc})") from None
    return _bounded_time(ts, value, field, now)


# Cached: a deployment has a few hundred sensors, and the lookup is cheaper than two regexes.
_sensor_key: Final = functools.lru_cache(maxsize=4096)(sensor_of_routing_key)
"""``(node, sensor)`` of ``sensors.<node>.<sensor>`` with valid ids, else None (cached)."""


def _same_as_topic(obj: Mapping[str, object], field: str, topic_value: str) -> str:
    """The payload's id, which must equal the (already validated) id in the routing key."""
    value = obj[field]
    if value == topic_value:
        return topic_value
    checked = _id(value, field)  # a wrong type or a malformed id gets its own reason
    raise Rejected(
        f"{field}: {_show(checked)} does not match the topic's {field} {_show(topic_value)}"
    )
