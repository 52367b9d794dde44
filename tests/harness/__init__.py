"""Private RabbitMQ and PostgreSQL servers for the tests, started from the installed binaries.

Each server lives in its own temp directory on free ports, configured by the repository's own
files under gateway/, so what the tests exercise is what docker compose deploys. Nothing here
touches a broker or a database that already runs on the machine.
"""

from tests.harness.postgres import PostgresServer
from tests.harness.rabbit import NodeCredentials, RabbitBroker

__all__ = ["NodeCredentials", "PostgresServer", "RabbitBroker"]
