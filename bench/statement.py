"""The database's share of a stored reading: our batch statement, part by part, against COPY.

    .venv/bin/python -m bench.statement [--readings 100000] [--repeat 3]

Starts a private PostgreSQL (the test harness) and writes the readings `bench.drain` queues
(50 nodes x 4 sensors, 10 ms apart, so a batch of 1,000 touches 200 sensors and 50 nodes) in
batches of 1,000, each variant into a new migrated database, and measures the CPU time of the
database backend per reading (from /proc, the process serving the connection) and the wall time:

  ours                    `Store.write`, as the consumer calls it: one statement inserts the
                          batch and keeps the sequence ranges, both rollups and the latest
                          reading per sensor from what it inserted (a plain INSERT, which
                          fails on a stored key; such a batch runs the same ON CONFLICT DO
                          NOTHING)
  - latest                the same statement without the latest-reading upsert
  - rollups               ... without the two rollup upserts
  insert only             ... with none of them: the INSERT ... RETURNING alone
  ours, ON CONFLICT       the statement a batch with a stored key runs (a redelivery)
  insert only, ON CONFLICT
                          its INSERT ... ON CONFLICT DO NOTHING RETURNING alone
  COPY                    what the minimal consumer of `bench.drain` does: COPY, commit
  ours / COPY, old id CHECKs
                          both again with the id CHECKs as they were before migration 0008
                          ('^[A-Za-z0-9_-]{1,64}$')

The variants with parts cut out are not correct consumers (a redelivered batch would count
twice in the rollups, or fail); they say what each part costs. Figures are medians of
``--repeat`` interleaved rounds, and ratios to COPY's backend CPU in the same round.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable, Sequence

import psycopg
from sqlalchemy import create_engine

from bench.cpu import cpu_seconds
from bench.drain import reading_rows
from pipeline import store as pipeline_store
from pipeline.decode import Reading
from pipeline.store import Store
from tests.harness import PostgresServer

BATCH = 1000
_COPY = "COPY readings (node, sensor, seq, kind, ts, temperature_c, humidity_pct) FROM STDIN"
# The id CHECKs of migrations 0001 and 0002, which 0008 replaced.
_OLD_ID_CHECKS = """
ALTER TABLE readings DROP CONSTRAINT readings_node_id, DROP CONSTRAINT readings_sensor_id,
    ADD CONSTRAINT readings_node_id CHECK (node ~ '^[A-Za-z0-9_-]{1,64}$'),
    ADD CONSTRAINT readings_sensor_id CHECK (sensor ~ '^[A-Za-z0-9_-]{1,64}$');
ALTER TABLE nodes DROP CONSTRAINT nodes_node_id,
    ADD CONSTRAINT nodes_node_id CHECK (node ~ '^[A-Za-z0-9_-]{1,64}$');
"""


def without(sql: str, *ctes: str) -> str:
    """The batch statement with the named data-modifying CTEs cut out."""
    for name in ctes:
        found = re.search(rf"\n{name} AS (MATERIALIZED )?\(", sql)
        if found is None:
            raise ValueError(f"no CTE {name} in the statement")
        end = re.search(r"\n\)(,?)\n", sql[found.start() :])
        if end is None:
            raise ValueError(f"CTE {name} does not end")
        if end[1]:  # followed by another CTE
            sql = sql[: found.start()] + "\n" + sql[found.start() + end.end() :]
        else:  # the last one: drop the comma before it
            head = sql[: found.start()].rstrip()
            sql = head.removesuffix(",") + "\n" + sql[found.start() + end.end() - 1 :]
    return sql


def backend_cpu_s(conn: psycopg.Connection) -> float:
    """CPU time (user + system) of the backend serving ``conn`` so far."""
    return cpu_seconds(conn.info.backend_pid)


Write = Callable[[psycopg.Connection, Store | None, list[Reading]], None]


def statement(sql: str) -> Write:
    def write(conn: psycopg.Connection, _store: Store | None, batch: list[Reading]) -> None:
        conn.execute(sql, pipeline_store._columns(batch, trusted=False)).fetchone()

    return write


def ours(_conn: psycopg.Connection, store: Store | None, batch: list[Reading]) -> None:
    assert store is not None
    result = store.write(batch)
    assert not result.refused


def copy(conn: psycopg.Connection, _store: Store | None, batch: list[Reading]) -> None:
    with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY) as rows:
        for r in batch:
            rows.write_row((r.node, r.sensor, r.seq, r.kind, r.ts, r.temperature_c, r.humidity_pct))


def run(
    pg: PostgresServer, write: Write, batches: Sequence[list[Reading]], *, old_checks: bool
) -> tuple[float, float]:
    """(backend CPU s, wall s) for writing ``batches`` into a new database."""
    _name, url = pg.migrated_database("stmt")
    if old_checks:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_OLD_ID_CHECKS)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"), pool_size=1)
    store = Store(engine) if write is ours else None
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            if store is not None:
                # The store's own connection is the one measured.
                store.write(batches[0][:1])
                held = next(iter(store._held))
                raw = held.connection.driver_connection
                assert isinstance(raw, psycopg.Connection)
                measured, first = raw, [batches[0][1:], *batches[1:]]
            else:
                measured, first = conn, list(batches)
            cpu0, wall0 = backend_cpu_s(measured), time.perf_counter()
            for batch in first:
                write(conn, store, batch)
            wall, cpu = time.perf_counter() - wall0, backend_cpu_s(measured) - cpu0
            stored = conn.execute("SELECT count(*) FROM readings").fetchone()
    finally:
        if store is not None:
            store.close()
        engine.dispose()
    expected = sum(len(b) for b in batches)
    if stored is None or stored[0] != expected:
        raise RuntimeError(f"stored {stored} of {expected}")
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rows = reading_rows(args.readings)
    batches = [
        sorted(rows[i : i + BATCH], key=pipeline_store._KEY) for i in range(0, len(rows), BATCH)
    ]
    plain = pipeline_store._WRITE_NEW_READINGS
    upsert = pipeline_store._WRITE_READINGS
    parts = ("ranges", "minutes", "rollup", "rollup10", "latest")
    variants: dict[str, tuple[Write, bool]] = {
        "ours": (ours, False),
        "- latest": (statement(without(plain, "latest")), False),
        "- rollups": (statement(without(plain, "rollup", "rollup10")), False),
        "insert only": (statement(without(plain, *parts)), False),
        "ours, ON CONFLICT": (statement(upsert), False),
        "insert only, ON CONFLICT": (statement(without(upsert, *parts)), False),
        "COPY": (copy, False),
        "ours, old id CHECKs": (ours, True),
        "COPY, old id CHECKs": (copy, True),
    }
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    ratio: dict[str, list[float]] = {name: [] for name in variants}
    with PostgresServer() as pg:
        for round_ in range(1, args.repeat + 1):
            print(f"round {round_} of {args.repeat}", flush=True)
            this: dict[str, float] = {}
            for name, (write, old) in variants.items():
                c, w = run(pg, write, batches, old_checks=old)
                this[name] = c
                cpu[name].append(c)
                wall[name].append(w)
            for name in variants:
                ratio[name].append(this[name] / this["COPY"])

    n = args.readings
    print()
    print(f"PostgreSQL's share: {n} readings in batches of {BATCH}, medians of {args.repeat}")
    print(f"{'variant':<26}{'backend CPU':>14}{'wall':>12}{'vs COPY':>10}")
    for name in variants:
        c = statistics.median(cpu[name]) / n * 1e6
        w = statistics.median(wall[name]) / n * 1e6
        print(f"{name:<26}{c:>11.1f} us{w:>9.1f} us{statistics.median(ratio[name]):>9.2f}x")


if __name__ == "__main__":
    main()
