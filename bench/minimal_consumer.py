"""bench.drain's minimal correct consumer (d), or its raw AMQP drain (a), as a process of its
own, for bench.e2e.

    .venv/bin/python -m bench.minimal_consumer AMQP_URL DATABASE_URL N
    .venv/bin/python -m bench.minimal_consumer --raw AMQP_URL N

(d) consumes ``readings`` until N readings are committed (COPY of each batch of 1,000, one
``basic_ack(multiple=True)`` after the commit). With ``--raw``, (a) takes N messages off the
queue (json.loads each, a multiple ack every 500) and stores nothing: the least any consumer
does. Either exits 0 once it has N, and gives up after 60 s with nothing delivered.
"""

from __future__ import annotations

import sys

import pika

from bench.drain import minimal, raw_amqp


class _Broker:
    def __init__(self, url: str) -> None:
        self.url = url

    def connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--raw":
        amqp_url, n = argv[1], int(argv[2])
        got = raw_amqp(_Broker(amqp_url), n, idle_s=60)
    elif len(argv) == 3:
        amqp_url, database_url, n = argv[0], argv[1], int(argv[2])
        got = minimal(_Broker(amqp_url), database_url, n, idle_s=60)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if got < n:
        print(f"minimal consumer: {got} of {n} messages, then nothing for 60 s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
