"""The ``pipeline`` command: migrate the database, consume readings, summarise them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import pika.exceptions
import psycopg
import sqlalchemy.exc

from pipeline import __version__
from pipeline.errors import ConfigError, PipelineError

__all__ = ["main"]

log = logging.getLogger("pipeline")


def _database_url(args: argparse.Namespace) -> str:
    """The database URL: ``--database-url`` (without a password) or DATABASE_URL.

    Raises:
        ConfigError: no URL at all, or ``--database-url`` carries a password: a command line is
            readable by every user of the machine (``ps``, /proc) and kept in shell history.
    """
    flag: str | None = args.database_url
    if flag:
        from pipeline.config import has_password, redact  # noqa: PLC0415

        if has_password(flag):
            raise ConfigError(
                f"--database-url {redact(flag)}: a password on the command line can be read by "
                "every user of this machine (ps) and stays in your shell history; put the URL "
                "in DATABASE_URL, or leave the password out of it and give it in PGPASSWORD "
                "or ~/.pgpass"
            )
        return flag
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set: export DATABASE_URL=postgresql://user@host:5432/db "
            "(the password in PGPASSWORD or ~/.pgpass) or pass --database-url without a password"
        )
    return url


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.migrate import migrate  # noqa: PLC0415 - keeps --help fast
    from pipeline.retention import RetentionPolicy, settle  # noqa: PLC0415

    url = _database_url(args)
    env = dict(os.environ)
    RetentionPolicy.parse_env(env)  # a malformed value stops us before migrating
    ran = migrate(url)
    if ran:
        for m in ran:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("database schema is up to date")
    actions, state = settle(url, env)
    for action in actions:
        print(f"partition {action.partition}: {action.action}")
    _print_retention(state)
    return 0


def _cmd_maintain(args: argparse.Namespace) -> int:
    from pipeline.retention import settle  # noqa: PLC0415

    actions, state = settle(_database_url(args))
    for action in actions:
        print(f"partition {action.partition}: {action.action}")
    if not actions:
        print("partitions are up to date")
    _print_retention(state)
    return 0


def _print_retention(rows: list[dict[str, object]]) -> None:
    for row in rows:
        keep = "for ever" if row["keep_days"] is None else f"{row['keep_days']} days"
        held_from = row["stored_from"] or "the oldest row"
        print(
            f"{row['tbl']}: kept {keep}, partitions by {row['unit']} "
            f"from {held_from} to {row['stored_to']}"
            + (f", dropped before {row['kept_from']}" if row["kept_from"] else "")
        )


def _cmd_consume(args: argparse.Namespace) -> int:
    from pipeline.config import ConsumerSettings  # noqa: PLC0415
    from pipeline.consumer import consume_forever, tune_collector  # noqa: PLC0415
    from pipeline.db import make_engine  # noqa: PLC0415
    from pipeline.metrics import serve_metrics  # noqa: PLC0415
    from pipeline.retention import PartitionMaintainer  # noqa: PLC0415
    from pipeline.store import Store  # noqa: PLC0415
    from pipeline.watchdog import ReaderWatchdog  # noqa: PLC0415

    env = dict(os.environ)
    env["DATABASE_URL"] = _database_url(args)
    settings = ConsumerSettings.from_env(env)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping on %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Migrations connect without these limits (pipeline.migrate); the consumer never waits
    # on the database without bound.
    # One connection per writer, one for the reader watchdog, one for partition maintenance.
    engine = make_engine(
        settings.database_url,
        pool_size=settings.db_writers + 2,
        timeouts=settings.database_timeouts,
    )
    tasks: list[ReaderWatchdog | PartitionMaintainer] = []
    try:
        if not _wait_for_schema(engine, stop):
            return 0
        serve_metrics(settings.metrics_port)
        if settings.reader_query_limit_s > 0:
            tasks.append(ReaderWatchdog(engine, limit_s=settings.reader_query_limit_s))
        if settings.maintain_interval_s > 0:
            tasks.append(PartitionMaintainer(engine, every_s=settings.maintain_interval_s))
        for task in tasks:
            task.start()
        store = Store(engine)
        tune_collector()
        consume_forever(settings, store, stop)
    finally:
        for task in tasks:
            task.stop()
        for task in tasks:
            task.join(15)
        engine.dispose()
    log.info("stopped")
    return 0


def _wait_for_schema(engine: sqlalchemy.Engine, stop: threading.Event) -> bool:
    """Wait until the database answers and is migrated; False if a stop came first."""
    from pipeline.migrate import available  # noqa: PLC0415

    wanted = available()[-1].version
    delay = 0.5
    logged = ""
    while not stop.is_set():
        try:
            with engine.connect() as conn:
                have = conn.execute(
                    sqlalchemy.text("SELECT coalesce(max(version), 0) FROM schema_migrations")
                ).scalar_one()
            if have >= wanted:
                return True
            problem = f"schema version {have}, need {wanted}: run `pipeline migrate`"
        except sqlalchemy.exc.ProgrammingError as exc:
            if isinstance(exc.orig, psycopg.errors.UndefinedTable):
                problem = "no schema_migrations table: run `pipeline migrate`"
            else:
                problem = str(exc.orig).strip().splitlines()[0]
        except sqlalchemy.exc.DBAPIError as exc:
            problem = f"database unreachable: {str(exc.orig).strip().splitlines()[0]}"
        if problem != logged:
            log.warning("waiting for the database: %s", problem)
            logged = problem
        stop.wait(delay)
        delay = min(delay * 2, 10.0)
    return False


def _cmd_summary(args: argparse.Namespace) -> int:
    from pipeline.db import make_engine  # noqa: PLC0415
    from pipeline.summary import format_table, last_hour  # noqa: PLC0415

    engine = make_engine(_database_url(args), pool_size=1)
    try:
        rows = last_hour(engine)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
    else:
        print(format_table(rows))
    return 0


def _amqp_settings() -> tuple[tuple[str, ...], bytes | None]:
    """The AMQP URLs and the dead-letter signing key, from the environment `consume` reads."""
    from pipeline.config import ConsumerSettings  # noqa: PLC0415

    env = dict(os.environ)
    env.setdefault("DATABASE_URL", "postgresql://unused")
    settings = ConsumerSettings.from_env(env)
    return settings.rabbitmq_urls, settings.dead_letter_key


def _cmd_dead_list(args: argparse.Namespace) -> int:
    from pipeline.deadletters import list_dead  # noqa: PLC0415

    urls, key = _amqp_settings()
    dead = list_dead(urls, args.queue, args.limit, key=key)
    if args.json:
        print(json.dumps([d.as_dict() for d in dead], indent=2))
        return 0
    if not dead:
        print(f"{args.queue} is empty")
    for d in dead:
        if d.routing_key:
            print(f"{d.rejected_at or '-'}  {d.routing_key}  (from {d.queue}, {d.size} bytes)")
            print(f"    origin: {d.origin_note}")
        else:
            claim = f"claims {d.claimed_routing_key}" if d.claimed_routing_key else "no claim"
            print(f"{d.rejected_at or '-'}  ?  ({claim}; {d.size} bytes)")
            print(f"    origin: NOT VERIFIED: {d.origin_note}")
        print(f"    reason: {d.reason}")
        print(f"    body:   {d.preview}")
    return 0


def _cmd_dead_replay(args: argparse.Namespace) -> int:
    from pipeline.deadletters import replay_dead  # noqa: PLC0415

    urls, key = _amqp_settings()
    result = replay_dead(urls, args.queue, args.limit, key=key, dry_run=args.dry_run)
    if args.dry_run:
        stay = (
            f", {result.unverified} would stay: their origin cannot be proved"
            if result.unverified
            else ""
        )
        print(
            f"dry run: {result.would_store} would now be stored, "
            f"{result.would_reject} would be rejected again{stay}; nothing was moved"
        )
    else:
        print(f"replayed {result.replayed} message(s) from {args.queue}")
        if result.unverified:
            print(
                f"left {result.unverified} message(s) in {args.queue}: their origin cannot be "
                "proved (see `pipeline dead list`)"
            )
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
    p.add_argument(
        "--database-url",
        help="default: $DATABASE_URL (needs the schema owner); no password here: "
        "use PGPASSWORD or ~/.pgpass",
    )
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser(
        "maintain",
        help="create the partitions ahead and drop those past their retention, once",
        description="The consumers do this at start and every PIPELINE_MAINTAIN_INTERVAL_S; "
        "retention is set by `pipeline migrate` from PIPELINE_RETENTION_RAW_DAYS, "
        "PIPELINE_RETENTION_MINUTE_DAYS and PIPELINE_RETENTION_10MIN_DAYS (see README).",
    )
    p.add_argument(
        "--database-url",
        help="default: $DATABASE_URL (the writer role is enough); no password here: "
        "use PGPASSWORD or ~/.pgpass",
    )
    p.set_defaults(func=_cmd_maintain)

    p = sub.add_parser(
        "consume",
        help="consume readings and node status into PostgreSQL until SIGTERM",
        description="Settings come from the environment: RABBITMQ_URL, RABBITMQ_USER, "
        "RABBITMQ_PASSWORD, DATABASE_URL, PIPELINE_PREFETCH, PIPELINE_BATCH_SIZE, "
        "PIPELINE_BATCH_MS, PIPELINE_METRICS_PORT, PIPELINE_LOG_INTERVAL_S, "
        "PIPELINE_DEAD_LETTER_KEY, PIPELINE_READER_QUERY_LIMIT_S, PIPELINE_DB_CONNECT_TIMEOUT_S, "
        "PIPELINE_DB_TCP_TIMEOUT_S, PIPELINE_DB_STATEMENT_TIMEOUT_S, PIPELINE_DB_LOCK_TIMEOUT_S, "
        "PIPELINE_DB_WRITERS, PIPELINE_MAINTAIN_INTERVAL_S "
        "(see README).",
    )
    p.add_argument(
        "--database-url", help="default: $DATABASE_URL; no password here: use PGPASSWORD"
    )
    p.set_defaults(func=_cmd_consume)

    p = sub.add_parser("summary", help="print the last hour per sensor")
    p.add_argument(
        "--database-url",
        help="default: $DATABASE_URL (the reader role is enough); no password here: "
        "use PGPASSWORD or ~/.pgpass",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_summary)

    dead = sub.add_parser("dead", help="inspect or replay dead letters")
    dead_sub = dead.add_subparsers(dest="dead_command", metavar="ACTION", required=True)
    p = dead_sub.add_parser("list", help="show dead letters with their reasons (left in place)")
    p.add_argument("--queue", default="readings.dead")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_dead_list)
    p = dead_sub.add_parser("replay", help="re-drive dead letters through the pipeline")
    p.add_argument("--queue", default="readings.dead")
    p.add_argument("--limit", type=int, default=1_000_000)
    p.add_argument("--dry-run", action="store_true", help="say what would happen, move nothing")
    p.set_defaults(func=_cmd_dead_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # pika logs every channel open and close at INFO; its warnings still show.
    logging.getLogger("pika").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pipeline: configuration error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    except (psycopg.OperationalError, sqlalchemy.exc.DBAPIError) as exc:
        if isinstance(exc, psycopg.OperationalError | sqlalchemy.exc.OperationalError):
            print(f"pipeline: cannot reach the database: {str(exc).strip()}", file=sys.stderr)
        else:  # a permission, or a schema older than the command needs
            first = str(exc.orig or exc).strip().splitlines()[0]
            print(f"pipeline: the database refused: {first}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as exc:
        print(f"pipeline: RabbitMQ refused or is unreachable: {exc!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
