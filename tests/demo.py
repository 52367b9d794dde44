"""The native demo: the whole gateway on this machine, without Docker.

    tests/demo.sh [--duration SECONDS]

Starts RabbitMQ and PostgreSQL from the installed server binaries (in temp directories, on
free ports, configured by gateway/ exactly as docker compose is), creates the roles and the
schema (`pipeline migrate`), starts two `pipeline consume` replicas and three simulated
`edge-agent run` nodes with their own broker users, and prints the last-hour summary as it
fills. Ctrl-C (or --duration) stops everything in order and removes the temp directories.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from pipeline.db import make_engine
from pipeline.summary import format_table, last_hour
from tests.harness import PostgresServer, RabbitBroker
from tests.harness.agent_proc import AgentProcess, write_config
from tests.harness.pipeline_proc import ConsumerProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/demo.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    parser.add_argument("--every", type=float, default=5, help="seconds between summaries")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    failures = 0
    print("starting RabbitMQ and PostgreSQL from the installed binaries ...", flush=True)
    with RabbitBroker() as broker, PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        db, _owner_url = pg.owned_database("tempmon")
        reader_url = pg.role_url(db, "reader")
        consumers = [ConsumerProcess(broker, pg.role_url(db, "pipeline")) for _ in range(2)]
        agents = [
            AgentProcess(
                write_config(
                    Path(tmp) / f"demo-{n}",
                    broker,
                    broker.add_node(f"demo-{n}"),
                    interval_s=1,
                    heartbeat_s=10,
                    seed_base=10 * n,
                )
            )
            for n in (1, 2, 3)
        ]
        print(
            f"\nRabbitMQ UI   http://127.0.0.1:{broker.management_port}/ "  # noqa: S608 - a hint
            f"(user {broker.admin.username}, password {broker.admin.password})\n"
            f"psql          psql '{reader_url}'\n"
            f"              SELECT * FROM sensor_summary_last_hour;\n"
            "two consumers and three simulated agents (demo-1..3) are running; Ctrl-C stops\n",
            flush=True,
        )
        engine = make_engine(reader_url, pool_size=1)
        waited = 0.0
        while not stop.wait(args.every):
            waited += args.every
            print(format_table(last_hour(engine)) + "\n", flush=True)
            if args.duration and waited >= args.duration:
                break
        engine.dispose()
        print("stopping: agents first (they flush and say offline), then the consumers")
        for agent in agents:
            code = agent.terminate()
            failures += code != 0
        for consumer in consumers:
            code = consumer.terminate()
            failures += code != 0
            consumer.close()
        print(format_table(last_hour(make_engine(reader_url, pool_size=1))))
    print("stopped" + (f" with {failures} failed process(es)" if failures else " cleanly"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
