"""The database after `pipeline migrate` holds readings to the contract (tempmon_contract).

The migrations spell the kinds, the id pattern and the measured ranges out in SQL; these
tests hold that SQL to the contract package, by what the database admits (an insert of each
value) and by the constraints' definitions in every partition, so that a kind added to the
contract without a migration (or a migration that drifts from it) fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pipeline.migrate import available, migrate
from tempmon_contract.ids import ID, ID_CHARS, ID_MAX, ID_PATTERN, SESSION
from tempmon_contract.kinds import HUMIDITY, KINDS, LEGACY, PRESSURE, Kind
from tests.conftest import Database
from tests.harness.postgres import PostgresServer

pytestmark = pytest.mark.system

_INSERT = (
    "INSERT INTO readings (node, sensor, seq, kind, ts, temperature_c, pressure_hpa)"
    " VALUES ('pi-1', 't1', %s, %s, %s, 20.0, %s)"
)
_ALL_KINDS: list[Kind] = [*KINDS.values(), LEGACY]


def _admits(
    conn: psycopg.Connection,
    seq: int,
    kind: str,
    pressure: float | None,
    ts: datetime | None = None,
) -> bool:
    """Whether the database stores this reading (in a savepoint: a refusal changes nothing)."""
    try:
        with conn.transaction():
            conn.execute(_INSERT, (seq, kind, ts or datetime.now(UTC), pressure))
    except psycopg.errors.CheckViolation:
        return False
    return True


def _admits_id(conn: psycopg.Connection, node: str, sensor: str = "t1") -> bool:
    """Whether the database stores a reading of these ids (as :func:`_admits`)."""
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO readings (node, sensor, seq, kind, ts, temperature_c)"
                " VALUES (%s, %s, 1, 'cpu', now(), 20.0)",
                (node, sensor),
            )
    except psycopg.errors.CheckViolation:
        return False
    return True


def _definitions(conn: psycopg.Connection, name: str) -> dict[str, str]:
    """``name``'s definition on readings and on each of its partitions, by table."""
    rows = conn.execute(
        "SELECT c.conrelid::regclass::text, pg_get_constraintdef(c.oid) FROM pg_constraint AS c"
        " WHERE c.conname = %s AND c.conrelid IN (SELECT 'readings'::regclass UNION ALL"
        "  SELECT inhrelid FROM pg_inherits WHERE inhparent = 'readings'::regclass)",
        (name,),
    ).fetchall()
    return dict(rows)


def _partitions(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'readings'::regclass"
    ).fetchall()
    return {r[0] for r in rows}


def test_the_kind_check_admits_exactly_the_contracts_kinds(database: Database) -> None:
    names = [k.name for k in _ALL_KINDS]
    assert names == [*KINDS, "legacy"]
    with psycopg.connect(database.writer_url) as conn:
        admitted = [
            name
            for seq, name in enumerate([*names, "thermistor", "BME280", "bme", "", "dht 22"])
            if _admits(conn, seq, name, None)
        ]
        # The definition, as PostgreSQL shows it, lists them in the contract's order, on the
        # parent and the same in every partition.
        definitions = _definitions(conn, "readings_kind")
        partitions = _partitions(conn)
    assert admitted == names
    assert set(definitions) == {"readings"} | partitions
    listed = re.findall(r"'([^']*)'::text", definitions["readings"])
    assert listed == names
    assert {d.removesuffix(" NOT VALID") for d in definitions.values()} == {
        definitions["readings"].removesuffix(" NOT VALID")
    }


@pytest.mark.parametrize("kind", _ALL_KINDS, ids=lambda k: k.name)
def test_only_kinds_that_measure_pressure_may_carry_it(database: Database, kind: Kind) -> None:
    measures = PRESSURE.field in kind.measures
    with psycopg.connect(database.writer_url) as conn:
        assert _admits(conn, 1, kind.name, None)
        assert _admits(conn, 2, kind.name, 1013.25) is measures
        if measures:
            low, high = kind.range_of(PRESSURE.field)
            assert (low, high) == (PRESSURE.low, PRESSURE.high)  # the SQL has one range
            assert _admits(conn, 3, kind.name, low)
            assert _admits(conn, 4, kind.name, high)
            assert not _admits(conn, 5, kind.name, low - 0.001)
            assert not _admits(conn, 6, kind.name, high + 0.001)
            assert not _admits(conn, 7, kind.name, float("nan"))


def test_the_humidity_check_is_the_contracts_widest_range(database: Database) -> None:
    with psycopg.connect(database.writer_url) as conn:
        definition = _definitions(conn, "readings_humidity_range")["readings"]
    bounds = re.search(
        r"humidity_pct >= \(?(-?[\d.]+)\)?.*humidity_pct <= \(?(-?[\d.]+)", definition
    )
    assert bounds is not None, definition
    assert (float(bounds[1]), float(bounds[2])) == (HUMIDITY.low, HUMIDITY.high)


def _id_check(column: str) -> str:
    """The definition PostgreSQL shows for the contract's id rule on ``column`` (0008)."""
    return f"CHECK ((({column} ~ '^{ID_CHARS}+$'::text) AND (octet_length({column}) <= {ID_MAX})))"


def test_the_id_checks_are_the_contracts_rule(database: Database) -> None:
    """On readings, each partition, and nodes; not as the contract's bounded-repeat pattern,
    which PostgreSQL's regex engine runs ten times slower (migration 0008)."""
    assert f"{ID_CHARS}{{1,{ID_MAX}}}" == ID_PATTERN
    with psycopg.connect(database.owner_url) as conn:
        node = _definitions(conn, "readings_node_id")
        sensor = _definitions(conn, "readings_sensor_id")
        nodes = conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE contype = 'c' AND conrelid = 'nodes'::regclass"
            " AND conname IN ('nodes_node_id', 'nodes_session')"
        ).fetchall()
    assert len(node) > 1  # the parent and its partitions
    assert set(node) == set(sensor)
    # NOT VALID on the parent and the partitions made by 0006; valid on those made later
    assert {d.removesuffix(" NOT VALID") for d in node.values()} == {_id_check("node")}
    assert {d.removesuffix(" NOT VALID") for d in sensor.values()} == {_id_check("sensor")}
    assert dict(nodes) == {
        "nodes_node_id": _id_check("node"),
        "nodes_session": f"CHECK ((session ~ '^{SESSION.pattern}$'::text))",
    }


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("a", True),
        ("A-z_09", True),
        ("x" * ID_MAX, True),
        ("x" * (ID_MAX + 1), False),
        ("", False),
        ("a.b", False),
        ("a/b", False),
        ("a b", False),
        ("pi-1\n", False),
        ("é", False),
    ],
)
def test_the_database_takes_exactly_the_contracts_ids(
    database: Database, value: str, ok: bool
) -> None:
    assert (ID.fullmatch(value) is not None) is ok  # the contract says the same
    with psycopg.connect(database.writer_url) as conn:
        assert _admits_id(conn, value) is ok
        assert _admits_id(conn, "pi-1", value) is ok


def test_a_partition_made_after_the_migration_enforces_the_contract(database: Database) -> None:
    """maintain_partitions() makes the partitions ahead: they take the new constraints too."""
    ahead = datetime.now(UTC) + timedelta(days=3)
    name = f"readings_p{ahead:%Y%m%d}"
    with psycopg.connect(database.owner_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {name}")
        conn.execute("SELECT count(*) FROM maintain_partitions()")
        assert name in _partitions(conn)
    with psycopg.connect(database.writer_url) as conn:
        assert _admits(conn, 1, "bme280", 1000.0, ahead)
        assert not _admits(conn, 2, "dht22", 1000.0, ahead)
        assert not _admits(conn, 3, "bme280", 200.0, ahead)
        assert not _admits(conn, 4, "thermistor", None, ahead)
        assert conn.execute(
            "SELECT tableoid::regclass::text, kind, pressure_hpa FROM readings"
        ).fetchall() == [(name, "bme280", 1000.0)]


# --- An existing database: 0007 over a table made before the partitions (0006) ------------------


@pytest.fixture
def database_v5(postgres: PostgresServer) -> Iterator[tuple[str, str]]:
    """A database migrated up to 0005 with a few rows; (owner URL, writer URL)."""
    name = postgres.create_database("v5c")
    postgres.init_roles(name)
    owner = postgres.role_url(name, "owner")
    migrate(owner, upto=5)
    with psycopg.connect(owner) as conn:
        conn.execute(
            "INSERT INTO readings (node, sensor, seq, kind, ts, temperature_c, humidity_pct)"
            " SELECT 'pi-old', 't1', m, 'dht22', now() - m * interval '1 hour', 20.0, 50.0"
            " FROM generate_series(1, 50) AS m"
        )
    yield owner, postgres.role_url(name, "pipeline")
    postgres.start()
    postgres.drop_database(name)


def test_the_table_from_before_the_partitions_takes_the_new_kind_and_pressure(
    database_v5: tuple[str, str],
) -> None:
    """readings_legacy (0006) had the old kind CHECK of its own: it is replaced there too."""
    owner, writer = database_v5
    ran = migrate(owner)
    assert [m.version for m in ran] == [m.version for m in available() if m.version > 5]
    with psycopg.connect(writer) as conn:
        # ts = now(): the old table's partition runs to the next midnight, so it takes these.
        assert _admits(conn, 1000, "bme280", 1013.25)
        assert not _admits(conn, 1001, "thermistor", None)
        assert not _admits(conn, 1002, "dht22", 1013.25)
        where = conn.execute(
            "SELECT tableoid::regclass::text FROM readings WHERE seq = 1000"
        ).fetchall()
        definitions = _definitions(conn, "readings_kind")
        node_ids = _definitions(conn, "readings_node_id")
        assert not _admits_id(conn, "x" * (ID_MAX + 1))
        old = conn.execute(
            "SELECT count(*), count(pressure_hpa) FROM readings WHERE node = 'pi-old'"
        ).fetchone()
    assert where == [("readings_legacy",)]
    assert "readings_legacy" in definitions
    assert node_ids["readings_legacy"] == _id_check("node") + " NOT VALID"
    assert old == (50, 0)
