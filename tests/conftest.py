"""Session-wide private servers: one RabbitMQ and one PostgreSQL, shared by every system test.

Set KEEP_TEST_SERVICES=1 to keep their temp directories (logs) after the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import PostgresServer, RabbitBroker
from tests.harness.docker import DockerEngine, StandIns, build_standins
from tests.harness.pipeline_proc import ConsumerProcess
from tests.harness.rabbit_container import RabbitContainer

_KEEP = os.environ.get("KEEP_TEST_SERVICES") == "1"


# The broker matrix: a test or module marked `both_brokers` runs once against the native broker
# (Debian's rabbitmq-server of this machine: 3.10 on Debian 12, 4.x on Debian 13) and once
# against RabbitMQ 4 in the rabbitmq:4-management stand-in image, run as docker compose runs it.
BROKERS = ("native", "rabbitmq4")


# --- parallel runs (pytest-xdist; tests/run.sh) ---------------------------------------------------
#
# Each worker has its own servers (the session fixtures below are per worker); what they share on
# the host is split or locked in tests/harness (ports, subnets, docker's address pools, the
# cache). tests/run.sh hands out one test at a time in the order collected here: the tests that
# take longest first, so that none of them starts last and keeps one worker busy while the
# others have finished; then whole modules, the costliest first. (xdist's loadfile and loadscope
# would reorder the modules by their number of tests, which puts the long single tests last.)
# How long a test takes is estimated from its marks: a test that raised its own timeout (the
# compose quick start, the Ansible chroot, the clusters, the Pi's unit) declared itself long.
_COST_S = {"slow": 60.0, "docker": 20.0, "system": 3.0}
# A test estimated to take at least this long goes before every module.
_LONG_S = 100.0


def _estimated_seconds(item: pytest.Item) -> float:
    cost = max((_COST_S[m.name] for m in item.iter_markers() if m.name in _COST_S), default=0.05)
    timeout = item.get_closest_marker("timeout")
    if timeout is not None and timeout.args:
        cost = max(cost, float(timeout.args[0]) / 8)
    params = getattr(item, "callspec", None)
    if params is not None and {"rabbitmq4", "compose"} & {str(v) for v in params.params.values()}:
        cost += _COST_S["docker"]  # a container broker or cluster: slower to start and to stop
    return cost


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order of the files
    cost = {item.nodeid: _estimated_seconds(item) for item in items}
    module_cost: dict[str, float] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        module_cost[module] = module_cost.get(module, 0.0) + cost[item.nodeid]

    def key(item: pytest.Item) -> tuple[float, float, str]:
        module = item.nodeid.split("::")[0]
        alone = cost[item.nodeid] if cost[item.nodeid] >= _LONG_S else 0.0
        return (-alone, -module_cost[module], module)

    # Every worker computes the same order (xdist requires it); the sort is stable, so a
    # module's tests keep their order.
    items.sort(key=key)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "rabbit" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_brokers"):
        metafunc.parametrize("broker_kind", BROKERS, indirect=True)


@pytest.fixture
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "native"))


@pytest.fixture(scope="session")
def rabbit_server() -> Iterator[RabbitBroker]:
    broker = RabbitBroker(keep=_KEEP)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def rabbit4_server(docker_engine: DockerEngine, standins: StandIns) -> Iterator[RabbitBroker]:
    """RabbitMQ 4 in the stand-in rabbitmq:4-management image, run as docker compose runs it."""
    broker = RabbitContainer(docker_engine, image=standins.tags["rabbitmq"], keep=_KEEP)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture
def rabbit(request: pytest.FixtureRequest, broker_kind: str) -> Iterator[RabbitBroker]:
    """The session broker, running and with empty queues, even if an earlier test killed it."""
    server: RabbitBroker = request.getfixturevalue(
        "rabbit_server" if broker_kind == "native" else "rabbit4_server"
    )
    server.start()
    server.purge("readings", "node-status", "readings.dead", "node-status.dead")
    yield server
    server.start()


@dataclass(frozen=True)
class Database:
    """A fresh, migrated database with the gateway's login roles.

    ``owner_url`` is the schema owner's role (tempmon_owner, not a superuser), as `pipeline
    migrate` runs in docker compose; ``superuser_url`` is the cluster's superuser.
    """

    server: PostgresServer
    name: str
    owner_url: str
    writer_url: str
    reader_url: str
    superuser_url: str


@pytest.fixture
def consumers(
    rabbit: RabbitBroker,  # noqa: ARG001 - the servers must outlive the consumers
    database: Database,  # noqa: ARG001
) -> Iterator[list[ConsumerProcess]]:
    """`pipeline consume` processes a test starts; killed (if alive) and closed after it."""
    started: list[ConsumerProcess] = []
    yield started
    for n, consumer in enumerate(started):
        if consumer.alive():
            consumer.kill()
        # pytest shows this only when the test failed.
        print(f"--- consumer {n} log ---\n{consumer.log[-4000:]}")
        consumer.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(keep=_KEEP)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """The session cluster, running even if an earlier test stopped it."""
    postgres_server.start()
    yield postgres_server
    postgres_server.start()


@pytest.fixture
def database(postgres: PostgresServer) -> Iterator[Database]:
    """A new database, with roles from gateway/postgres/ and the schema from `pipeline migrate`
    (a copy of one database it migrated: see PostgresServer.migrated_database)."""
    name, owner_url = postgres.migrated_database()
    yield Database(
        server=postgres,
        name=name,
        owner_url=owner_url,
        writer_url=postgres.role_url(name, "pipeline"),
        reader_url=postgres.role_url(name, "reader"),
        superuser_url=postgres.url(name),
    )
    postgres.start()
    postgres.drop_database(name)


# --- Docker: a private engine and the stand-in images -------------------------------------------


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A private dockerd for the session (root only: CI runs as root), stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a private Docker Engine needs root (CI runs the tests as root)")
    engine = DockerEngine(keep=_KEEP)
    try:
        engine.start()
        print(f"private dockerd up in {engine.start_seconds:.1f} s")
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def standins(docker_engine: DockerEngine) -> StandIns:
    """rabbitmq:4-management, postgres:17 and python:3.12-slim built from Debian 13 packages."""
    built = build_standins(docker_engine)
    print(
        "stand-in images: "
        + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in built.seconds.items())
    )
    return built
