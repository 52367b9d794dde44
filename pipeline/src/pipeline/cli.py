"""The ``pipeline`` command: migrate the database, consume readings, summarise them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import psycopg

from pipeline import __version__
from pipeline.errors import ConfigError, PipelineError

__all__ = ["main"]

log = logging.getLogger("pipeline")


def _database_url(args: argparse.Namespace) -> str:
    url: str = args.database_url or os.environ.get("DATABASE_URL", "")
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set: export DATABASE_URL=postgresql://user:pass@host:5432/db "
            "or pass --database-url"
        )
    return url


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.migrate import migrate  # noqa: PLC0415 - keeps --help fast

    ran = migrate(_database_url(args))
    if ran:
        for m in ran:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("database schema is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Gateway pipeline: RabbitMQ readings into PostgreSQL exactly once.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: $LOG_LEVEL or INFO",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("migrate", help="create or upgrade the database schema (re-runnable)")
    p.add_argument("--database-url", help="default: $DATABASE_URL (needs the schema owner)")
    p.set_defaults(func=_cmd_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pipeline: configuration error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"pipeline: cannot reach the database: {str(exc).strip()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
