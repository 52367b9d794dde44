"""The ``edge-agent`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge_agent import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=(
            "Edge agent: DS18B20, DHT22, CPU or simulated temperature readings to MQTT "
            "through a durable outbox."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
