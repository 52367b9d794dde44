"""The ``edge-agent`` command: run, read (a wiring check), detect (1-Wire), status.

Exit codes: 0 done, 1 an error (the message says which), 2 a configuration error, 75
(EX_TEMPFAIL) ``run`` stopped on a damaged outbox: systemd starts the agent again, and that
start keeps the damaged file aside and recovers what it can (see :mod:`edge_agent.outbox`),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from edge_agent import __version__
from edge_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from edge_agent.errors import ConfigError, EdgeError, SensorError

__all__ = ["main"]

log = logging.getLogger("edge_agent")

EXIT_OUTBOX_CORRUPT: Final = 75
"""``edge-agent run`` stopped on a damaged outbox: EX_TEMPFAIL of sysexits.h, try again."""


def _config(args: argparse.Namespace, *, simulate: bool = False) -> AgentConfig:
    path: Path | None = args.config
    if path is None and "EDGE_CONFIG" in os.environ:
        path = Path(os.environ["EDGE_CONFIG"])
    return load_config(path, simulate=simulate)


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent  # noqa: PLC0415
    from edge_agent.outbox import OutboxCorrupt  # noqa: PLC0415

    config = _config(args, simulate=args.simulate)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        Agent(config).run(stop)
    except OutboxCorrupt as exc:  # logged by the agent; the next start recovers the file
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_OUTBOX_CORRUPT
    return 0


def _cmd_read(args: argparse.Namespace) -> int:
    from edge_agent.sensors.registry import build_sensor  # noqa: PLC0415

    config = _config(args, simulate=args.simulate)
    failed = 0
    for sensor_config in config.sensors:
        try:
            sensor = build_sensor(sensor_config, config)
        except EdgeError as exc:
            print(f"{sensor_config.id:<20} {sensor_config.kind:<9} ERROR {exc}")
            failed += 1
            continue
        try:
            sample = sensor.read()
        except SensorError as exc:
            print(f"{sensor.id:<20} {sensor.kind:<9} ERROR {exc}")
            failed += 1
        else:
            humidity = "" if sample.humidity_pct is None else f"  {sample.humidity_pct:.1f} %RH"
            pressure = "" if sample.pressure_hpa is None else f"  {sample.pressure_hpa:.2f} hPa"
            print(
                f"{sensor.id:<20} {sensor.kind:<9} {sample.temperature_c:7.2f} °C"
                f"{humidity}{pressure}"
            )
        finally:
            sensor.close()
    return 1 if failed else 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from edge_agent.sensors.ds18b20 import W1_ROOT, discover  # noqa: PLC0415

    root: Path = args.w1_root or W1_ROOT
    if not root.is_dir():
        print(
            f"{root} does not exist: the 1-Wire bus is not enabled. Add dtoverlay=w1-gpio to "
            "/boot/firmware/config.txt and reboot (see hardware.md)."
        )
        return 1
    found = discover(root)
    if not found:
        print(
            f"no DS18B20 found under {root}: check the data wire (GPIO 4 by default), the "
            "4.7 kΩ pull-up to 3.3 V and the sensor's orientation (see hardware.md)."
        )
        return 1
    for device in found:
        print(device)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_agent.outbox import Outbox  # noqa: PLC0415
    from tempmon_contract.wire import utc_iso  # noqa: PLC0415

    config = _config(args, simulate=args.simulate)
    if not config.outbox.path.exists():
        print(f"no outbox at {config.outbox.path}: the agent has not run yet")
        return 1
    # recover=False: the agent may be running; only the agent checks and recovers its file.
    with Outbox(config.outbox.path, recover=False) as outbox:
        last = outbox.meta("last_puback_at")
        errors = outbox.meta("read_errors")
        oldest = outbox.oldest_ts()
        timeouts, timed_out_publishes = outbox.puback_timeouts()
        last_timeout = outbox.meta("last_puback_timeout_at")
        recoveries, last_recovery = outbox.recoveries()
        status = {
            "node": config.node_id,
            "outbox": str(config.outbox.path),
            "outbox_depth": outbox.depth(),
            "held_for_clock": outbox.held(),
            "oldest_reading": utc_iso(oldest) if oldest else None,
            "last_publish_acknowledged": utc_iso(float(last))
            if isinstance(last, int | float)
            else None,
            "dropped_total": outbox.dropped_total(),
            "read_errors": json.loads(errors) if isinstance(errors, str) else {},
            # Sessions the agent ended because the broker withheld PUBACKs (a full queue or a
            # broker alarm), and the publishes then waiting: sent again, not lost.
            "puback_timeouts": timeouts,
            "puback_timeout_publishes": timed_out_publishes,
            "last_puback_timeout": utc_iso(float(last_timeout))
            if isinstance(last_timeout, int | float)
            else None,
            # Damaged outbox files the agent kept aside and recovered from (a failing SD card).
            "outbox_recoveries": recoveries,
            "last_outbox_recovery": last_recovery,
        }
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for key, value in status.items():
            print(f"{key:<26} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=(
            "Edge agent: DS18B20, DHT22, CPU or simulated temperature readings to MQTT "
            "through a durable outbox."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        help=f"TOML configuration (default: $EDGE_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    common.add_argument(
        "--simulate",
        action="store_true",
        help="without a configuration file: three simulated sensors, broker on localhost",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("run", parents=[common], help="sample and publish until SIGTERM")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("read", parents=[common], help="read each configured sensor once")
    p.set_defaults(func=_cmd_read)
    p = sub.add_parser("detect", help="list the DS18B20 sensors on the 1-Wire bus")
    p.add_argument("--w1-root", type=Path, help="default: /sys/bus/w1/devices")
    p.set_defaults(func=_cmd_detect)
    p = sub.add_parser(
        "status",
        parents=[common],
        help="outbox depth, last publish, errors, PUBACK timeouts, outbox recoveries",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.Formatter.converter = time.gmtime
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except EdgeError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
