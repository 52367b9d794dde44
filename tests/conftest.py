"""Session-wide private servers: one RabbitMQ and one PostgreSQL, shared by every system test.

Set KEEP_TEST_SERVICES=1 to keep their temp directories (logs) after the run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import PostgresServer, RabbitBroker

_KEEP = os.environ.get("KEEP_TEST_SERVICES") == "1"


@pytest.fixture(scope="session")
def rabbit_server() -> Iterator[RabbitBroker]:
    broker = RabbitBroker(keep=_KEEP)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture
def rabbit(rabbit_server: RabbitBroker) -> Iterator[RabbitBroker]:
    """The session broker, running and with empty queues, even if an earlier test killed it."""
    rabbit_server.start()
    rabbit_server.purge("readings", "node-status", "readings.dead", "node-status.dead")
    yield rabbit_server
    rabbit_server.start()


@dataclass(frozen=True)
class Database:
    """A fresh, migrated database with the gateway's login roles."""

    server: PostgresServer
    name: str
    owner_url: str
    writer_url: str
    reader_url: str


_ROLE_PASSWORDS = {"pipeline": secrets.token_urlsafe(12), "reader": secrets.token_urlsafe(12)}


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
    """A new database, with roles from gateway/postgres/ and the schema from `pipeline migrate`."""
    from pipeline.migrate import migrate  # noqa: PLC0415

    name = postgres.create_database()
    postgres.init_roles(name, _ROLE_PASSWORDS)
    owner_url = postgres.url(name)
    migrate(owner_url)
    yield Database(
        server=postgres,
        name=name,
        owner_url=owner_url,
        writer_url=postgres.url(name, "pipeline", _ROLE_PASSWORDS["pipeline"]),
        reader_url=postgres.url(name, "reader", _ROLE_PASSWORDS["reader"]),
    )
    postgres.start()
    postgres.drop_database(name)
