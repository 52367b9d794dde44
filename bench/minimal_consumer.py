"""bench.drain's minimal correct consumer (d) as a process of its own, for bench.e2e.

    .venv/bin/python -m bench.minimal_consumer AMQP_URL DATABASE_URL N

Consumes ``readings`` until N readings are committed (COPY of each batch of 1,000, one
``basic_ack(multiple=True)`` after the commit), then exits 0; it gives up after 60 s with
nothing delivered.
"""

from __future__ import annotations

import sys

import pika

from bench.drain import minimal


class _Broker:
    def __init__(self, url: str) -> None:
        self.url = url

    def connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    amqp_url, database_url, n = argv[0], argv[1], int(argv[2])
    got = minimal(_Broker(amqp_url), database_url, n, idle_s=60)
    if got < n:
        print(f"minimal consumer: {got} of {n} readings, then nothing for 60 s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
