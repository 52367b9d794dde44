"""The fast path for canonical v1 readings (msgspec).

Almost every reading arrives exactly as the agents write it (``tempmon_contract.wire``):
compact JSON, the fields in wire order, defaults left out. For such a payload msgspec parses
and type-checks the whole object in one step in C, a tenth of the pure-Python path's cost. The
fast path takes a payload only when re-encoding what msgspec read gives back the very same
bytes: that rules out duplicate keys, unknown fields, explicit nulls, integers written for
floats, escapes and any other form whose meaning the full decoder would have to judge. It
never rejects anything itself: whatever it does not take (any failure, any check that does
not pass) goes to the full decoder (:mod:`pipeline.decode.reading`), which accepts or rejects
it with its reason. So the results are the full decoder's by construction, and
tests/unit/test_decode_fast.py holds the two to each other on generated payloads. Without
msgspec (a platform without its wheels) the full decoder alone runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Final

from pipeline.decode._common import _sensor_key, _utc_time
from pipeline.decode.reading import Reading
from pipeline.errors import Rejected
from tempmon_contract.kinds import HUMIDITY, KINDS, PRESSURE
from tempmon_contract.wire import MAX_PAYLOAD_BYTES, MAX_SEQ, VERSION

__all__ = ["decode_reading_fast"]

try:
    import msgspec
except ImportError:  # pragma: no cover - the platforms we test all have msgspec
    msgspec = None  # type: ignore[assignment]

if msgspec is not None:

    class _CanonicalV1(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
        """A v1 reading in the agents' own form (field order is the wire order,
        ``tempmon_contract.wire.READING_FIELDS``)."""

        version: int
        node: str
        sensor: str
        kind: str
        seq: int
        ts: str
        temperature_c: float
        humidity_pct: float | None = None
        pressure_hpa: float | None = None
        time_uncertain: bool = False

    _FAST_DECODER: Final = msgspec.json.Decoder(_CanonicalV1)
    _FAST_ENCODE: Final = msgspec.json.Encoder().encode
    _FAST_ERRORS: Final = (msgspec.DecodeError, Rejected)

# An empty range for a field the kind does not measure: no value lies in it.
_NONE: Final = (math.inf, -math.inf)
_LIMITS: Final[Mapping[str, tuple[float, float, float, float, float, float]]] = MappingProxyType(
    {
        name: (
            *spec.temperature,
            *(spec.range_of(HUMIDITY.field) if HUMIDITY.field in spec.measures else _NONE),
            *(spec.range_of(PRESSURE.field) if PRESSURE.field in spec.measures else _NONE),
        )
        for name, spec in KINDS.items()
    }
)
"""By kind: temperature, humidity and pressure ranges, flat, for one lookup per message."""


def decode_reading_fast(body: bytes, routing_key: str, *, now: datetime) -> Reading | None:
    """The reading of a canonical, valid v1 payload, or None: then the full decoder decides
    (and gives the reason if it rejects). Never raises for any input."""
    if msgspec is None or len(body) > MAX_PAYLOAD_BYTES:
        return None
    try:
        m = _FAST_DECODER.decode(body)
        topic = _sensor_key(routing_key)
        humidity, pressure = m.humidity_pct, m.pressure_hpa
        limits = _LIMITS.get(m.kind)
        if (
            _FAST_ENCODE(m) != body
            or m.version != VERSION
            or topic is None
            or m.node != topic[0]
            or m.sensor != topic[1]
            or limits is None
            or not limits[0] <= m.temperature_c <= limits[1]
            or not 0 <= m.seq <= MAX_SEQ
            or (humidity is not None and not limits[2] <= humidity <= limits[3])
            or (pressure is not None and not limits[4] <= pressure <= limits[5])
        ):
            return None
        ts = _utc_time(m.ts, "ts", now)
    except _FAST_ERRORS:
        return None
    return Reading(
        topic[0],
        topic[1],
        m.kind,
        m.seq,
        ts,
        m.temperature_c,
        humidity,
        m.time_uncertain,
        pressure,
    )
