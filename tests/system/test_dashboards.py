"""Every Grafana panel's query runs, as the read-only role, against a database with data."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pipeline.db import make_engine
from pipeline.decode import NodeStatus, Reading
from pipeline.store import Store
from tests.conftest import Database
from tests.harness.procs import REPO

pytestmark = pytest.mark.system

DASHBOARD = REPO / "gateway" / "grafana" / "dashboards" / "tempmon.json"


def grafana_macros(sql: str) -> str:
    """Expand the Grafana PostgreSQL macros the dashboard uses, for the last six hours."""
    sql = re.sub(
        r"\$__timeGroupAlias\((\w+),\s*'(\d+)m'\)",
        r"date_bin('\2 minutes', \1, timestamptz '2000-01-01') AS time",
        sql,
    )
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN now() - interval '6 hours' AND now()", sql
    )
    assert "$__" not in sql, f"unexpanded macro in {sql}"
    return sql


def test_every_panel_query_returns_rows(database: Database) -> None:
    rng = random.Random(5)
    now = datetime.now(UTC)
    readings = [
        Reading(
            f"pi-{n % 2}",
            f"s{n % 3}",
            "dht22",
            n,
            now - timedelta(seconds=7 * n),
            rng.uniform(15, 25),
            rng.uniform(30, 60),
            False,
        )
        for n in range(2000)
    ]
    store = Store(make_engine(database.writer_url))
    store.write(readings)
    store.write(
        [],
        [
            NodeStatus("pi-0", "online", now, "0.1.0", 5.0, 0, 0, {"s0": 0}),
            NodeStatus("pi-1", "offline", None, None, None, None, None, None),
        ],
    )
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["type"] for p in panels} >= {"timeseries", "table"}
    with psycopg.connect(database.reader_url) as conn:
        for panel in panels:
            for target in panel["targets"]:
                rows = conn.execute(grafana_macros(target["rawSql"])).fetchall()
                assert rows, f"panel {panel['title']!r} returned nothing"
                if panel["type"] == "timeseries":
                    assert isinstance(rows[0][0], datetime)
                    assert {r[1] for r in rows} == {
                        f"pi-{a}/s{b}" for a in (0, 1) for b in (0, 1, 2)
                    }
