"""`pipeline summary`: the last hour per sensor, from the sensor_summary_last_hour view."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text

__all__ = ["format_table", "last_hour"]

_QUERY = text(
    "SELECT node, sensor, kind, readings, avg_c, min_c, max_c, avg_humidity_pct,"
    " min_humidity_pct, max_humidity_pct, avg_pressure_hpa, min_pressure_hpa, max_pressure_hpa,"
    " first_ts, last_ts"
    " FROM sensor_summary_last_hour ORDER BY node, sensor"
)


def last_hour(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(_QUERY)]


def _cell(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, datetime):
        return value.strftime("%H:%M:%S")
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table a person reads in a terminal."""
    header = [
        "node",
        "sensor",
        "kind",
        "n",
        "avg °C",
        "min °C",
        "max °C",
        "avg %RH",
        "avg hPa",
        "last",
    ]
    lines = [header]
    lines.extend(
        [
            r["node"],
            r["sensor"],
            r["kind"],
            _cell(r["readings"]),
            _cell(r["avg_c"]),
            _cell(r["min_c"]),
            _cell(r["max_c"]),
            _cell(r["avg_humidity_pct"], 1),
            _cell(r["avg_pressure_hpa"], 1),
            _cell(r["last_ts"]),
        ]
        for r in rows
    )
    if not rows:
        return "no readings in the last hour"
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
