"""The agent's configuration: one TOML file plus environment overrides, checked once at start.

Every key is validated here, with errors that name the key and the value; nothing past this
module sees raw configuration. A secret (the MQTT password) is the exception: an error names
its key and the type it must have, never its value, and ``repr()`` of the configuration leaves
it out, so it cannot reach a log line or a traceback. Environment variables override file values:

    EDGE_NODE_ID, EDGE_MQTT_HOST, EDGE_MQTT_HOSTS, EDGE_MQTT_PORT, EDGE_MQTT_USERNAME,
    EDGE_MQTT_PASSWORD, EDGE_MQTT_PASSWORD_FILE, EDGE_MQTT_TLS_CA_FILE, EDGE_MQTT_TLS_CERT_FILE,
    EDGE_MQTT_TLS_KEY_FILE, EDGE_OUTBOX_PATH, EDGE_OUTBOX_DRAIN_RATE_PER_S,
    EDGE_AGENT_HEARTBEAT_S, EDGE_AGENT_LED_PIN, EDGE_CLOCK_REQUIRE_SYNC

``EDGE_MQTT_HOSTS`` is a comma-separated list (``gw-1,gw-2:1884,[2001:db8::3]``); blank, it
counts as not set.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.sensors.fields import COMMON_FIELDS, Field
from edge_agent.sensors.registry import REGISTRY
from tempmon_contract.ids import ID, ID_RULE

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_BROKERS",
    "AgentConfig",
    "Broker",
    "ClockConfig",
    "MqttConfig",
    "OutboxConfig",
    "SensorConfig",
    "load_config",
    "simulate_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/config.toml")
DEFAULT_OUTBOX_PATH = Path("/var/lib/edge-agent/outbox.sqlite")
_ID = ID
MAX_BROKERS = 16
"""The most entries ``mqtt.hosts`` may have."""
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Broker:
    """One MQTT broker the agent may connect to: a host name or IP address, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        """``host:port``, an IPv6 address in brackets (``[2001:db8::1]:1883``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    """How the agent reaches the broker.

    ``password`` is left out of ``repr()`` (and so of the ``repr()`` of :class:`AgentConfig`):
    a configuration object printed in a log line or shown in a traceback must not carry it.

    ``max_inflight`` (1..1000, default 100) bounds the publishes waiting for their PUBACK
    (paho's window). Readings take all of it but one slot, kept for status messages; with 1,
    readings go one at a time and a status waits behind the reading in flight.

    ``puback_timeout_s`` (1..3600 s, default 30) is how long the oldest of them may wait. MQTT
    3.1.1 has no negative acknowledgement: RabbitMQ 4.x answers a publish its queue refuses
    (a full queue with ``overflow = reject-publish``, or a broker alarm) with no PUBACK at all
    and keeps the connection open, so without this limit the window fills and the agent waits
    forever. Past it the agent ends the session, counts the episode (``edge-agent status``)
    and reconnects with back-off, sending everything unacknowledged again from the outbox. Too
    short a value on a slow link only costs reconnects and duplicates, which the pipeline
    ignores.

    ``brokers`` are the brokers the agent may use (``mqtt.hosts``, or the one ``mqtt.host``):
    the nodes of a RabbitMQ cluster, each reachable on its own. The agent starts on a random
    one and moves to another when a connection fails or a session ends (see
    :class:`edge_agent.agent.BrokerRotation`). ``host`` and ``port`` are the first of them,
    for code that knows one broker; given without ``brokers``, they make the one-broker list.
    """

    host: str = "localhost"
    port: int = 1883
    brokers: tuple[Broker, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 60
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    max_inflight: int = 100
    puback_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.brokers:
            object.__setattr__(self, "brokers", (Broker(self.host, self.port),))
        else:
            object.__setattr__(self, "host", self.brokers[0].host)
            object.__setattr__(self, "port", self.brokers[0].port)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    """Where readings wait for their PUBACK, and how many of them may wait.

    ``max_rows`` (100..100,000,000, default 1,000,000): beyond it the oldest readings are
    dropped. ``max_age_days`` (0.01..3650, default 30): older readings are dropped. A reading's
    age is its real age: within the boot it was taken in it is measured by CLOCK_BOOTTIME,
    whatever the wall clock said or says; a reading of an earlier boot is aged by its time
    only while the clock is synchronised, and never if its time is uncertain (``max_rows``
    still bounds it). Both checks run once a minute; what they drop is counted in
    ``dropped_total`` (``edge-agent status``, and ``dropped`` in the heartbeat).
    ``drain_rate_per_s`` (1..100,000, default 500) paces the sending after an outage.
    """

    path: Path = DEFAULT_OUTBOX_PATH
    max_rows: int = 1_000_000
    max_age_days: float = 30.0
    drain_rate_per_s: float = 500.0


@dataclass(frozen=True, kw_only=True)
class ClockConfig:
    require_sync: bool = True
    hold_max_s: float = 6 * 3600.0


@dataclass(frozen=True, kw_only=True)
class SensorConfig:
    """One ``[[sensors]]`` table: the keys every kind has, and ``settings``, the keys of its
    kind's driver (declared by the driver class, see :mod:`edge_agent.sensors.registry`),
    checked and with their defaults where the table left them out."""

    id: str
    kind: str
    interval_s: float = 30.0
    offset_c: float = 0.0
    median_window: int = 1
    settings: Mapping[str, object] = field(default_factory=dict, hash=False)

    # The old attribute names, for code written before the registry (agent.py's build_sensor
    # until it imports edge_agent.sensors.registry's); new code reads ``settings``.
    @property
    def pin(self) -> int | None:
        value = self.settings.get("pin")
        return value if isinstance(value, int) else None

    @property
    def device(self) -> str | None:
        value = self.settings.get("device")
        return value if isinstance(value, str) else None

    @property
    def seed(self) -> int | None:
        value = self.settings.get("seed")
        return value if isinstance(value, int) else None

    @property
    def humidity(self) -> bool:
        return self.settings.get("humidity") is True

    @property
    def dropout_rate(self) -> float:
        value = self.settings.get("dropout_rate")
        return float(value) if isinstance(value, int | float) else 0.0

    @property
    def spike_rate(self) -> float:
        value = self.settings.get("spike_rate")
        return float(value) if isinstance(value, int | float) else 0.0


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    node_id: str
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    sensors: tuple[SensorConfig, ...] = ()
    heartbeat_s: float = 60.0
    led_pin: int | None = None
    w1_root: Path = Path("/sys/bus/w1/devices")
    shutdown_flush_s: float = 5.0


# --- typed readers ----------------------------------------------------------------------------


class _Section:
    """One TOML table: typed getters that name the key in every error, and unknown-key checks."""

    def __init__(self, name: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"[{name}] must be a table, not {type(data).__name__}")
        self.name = name
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def _get(self, key: str) -> object:
        self.used.add(key)
        return self.data.get(key)

    def raw(self, key: str) -> object:
        """The value as it is, of whatever type: for a caller that checks it itself."""
        return self._get(key)

    def text(self, key: str, default: str | None = None, *, secret: bool = False) -> str | None:
        """A string value; with ``secret``, an error names the key and the type, not the value.

        Raises:
            ConfigError: the value is not a string (``password = 123456`` is an integer in
                TOML: it must be quoted).
        """
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            if secret:
                raise ConfigError(
                    f"{self.key(key)} must be a string: put it in quotes (its value is not shown)"
                )
            raise ConfigError(f"{self.key(key)} = {value!r} must be a string")
        return value

    def integer(self, key: str, default: int | None, low: int, high: int) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(key)} = {value!r} must be an integer")
        if not low <= value <= high:
            raise ConfigError(f"{self.key(key)} = {value} is outside {low}..{high}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{self.key(key)} = {value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(key)} = {value!r} must be a number")
        if not low <= value <= high:
            raise ConfigError(f"{self.key(key)} = {value} is outside {low}..{high}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
            return value.lower() in {"true", "1", "yes"}
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(key)} = {value!r} must be true or false")
        return value

    def path(self, key: str, default: Path | None = None) -> Path | None:
        value = self.text(key)
        return Path(value) if value else default

    def finish(self, *subtables: str) -> None:
        unknown = set(self.data) - self.used - set(subtables)
        if unknown:
            where = f"[{self.name}]" if self.name else "the top level"
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")


def _check_id(key: str, value: str) -> str:
    if not _ID.fullmatch(value):
        raise ConfigError(
            f"{key} = {value!r} is not a valid id: use {ID_RULE} "
            "(a dot or slash would change the MQTT topic)"
        )
    return value


def default_node_id() -> str:
    """The hostname, made into a valid id (`pi.local` -> `pi-local`)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "edge"


# --- environment overrides --------------------------------------------------------------------

_ENV: Mapping[str, tuple[str, str]] = {
    "EDGE_NODE_ID": ("node", "id"),
    "EDGE_MQTT_HOST": ("mqtt", "host"),
    "EDGE_MQTT_HOSTS": ("mqtt", "hosts"),
    "EDGE_MQTT_PORT": ("mqtt", "port"),
    "EDGE_MQTT_USERNAME": ("mqtt", "username"),
    "EDGE_MQTT_PASSWORD": ("mqtt", "password"),
    "EDGE_MQTT_PASSWORD_FILE": ("mqtt", "password_file"),
    "EDGE_MQTT_TLS_CA_FILE": ("mqtt", "ca_file"),
    "EDGE_MQTT_TLS_CERT_FILE": ("mqtt", "cert_file"),
    "EDGE_MQTT_TLS_KEY_FILE": ("mqtt", "key_file"),
    "EDGE_OUTBOX_PATH": ("outbox", "path"),
    "EDGE_OUTBOX_DRAIN_RATE_PER_S": ("outbox", "drain_rate_per_s"),
    "EDGE_AGENT_HEARTBEAT_S": ("agent", "heartbeat_s"),
    "EDGE_AGENT_LED_PIN": ("agent", "led_pin"),
    "EDGE_CLOCK_REQUIRE_SYNC": ("clock", "require_sync"),
}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Put the environment's values into ``raw``; return {"section.key": variable} of them."""
    origins: dict[str, str] = {}
    for var, (section, key) in _ENV.items():
        if var in env:
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] must be a table")
            table[key] = env[var]
            origins[f"{section}.{key}"] = var
    return origins


# --- loading ----------------------------------------------------------------------------------


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    simulate: bool = False,
) -> AgentConfig:
    """Read ``path`` (default /etc/edge-agent/config.toml) and the environment.

    With ``simulate`` and no file, the agent runs three simulated sensors against a broker on
    localhost and keeps its outbox in the user's state directory.

    Raises:
        ConfigError: the file is missing (and not simulating), is not TOML, or a key is
            unknown, mistyped or out of range; the message names the key and the value.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    file = path or DEFAULT_CONFIG_PATH
    if file.exists():
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    elif path is not None or not simulate:
        raise ConfigError(
            f"configuration file {file} not found: create it (see the README) "
            "or run `edge-agent run --simulate` to try the agent without hardware"
        )
    origins = _apply_env(raw, env)
    return _parse(raw, simulate=simulate, from_file=file.exists(), origins=origins)


def simulate_config(env: Mapping[str, str] | None = None) -> AgentConfig:
    return load_config(None, env, simulate=True)


def _parse(
    raw: dict[str, Any],
    *,
    simulate: bool,
    from_file: bool,
    origins: Mapping[str, str] | None = None,
) -> AgentConfig:
    top = _Section("", raw)
    node = _Section("node", raw.get("node", {}))
    node_id = _check_id("node.id", node.text("id") or default_node_id())
    node.finish()

    mqtt = _parse_mqtt(_Section("mqtt", raw.get("mqtt", {})), node_id, origins or {})
    outbox = _parse_outbox(_Section("outbox", raw.get("outbox", {})), simulate and not from_file)
    clock_t = _Section("clock", raw.get("clock", {}))
    clock = ClockConfig(
        require_sync=clock_t.flag("require_sync", not (simulate and not from_file)),
        hold_max_s=clock_t.number("hold_max_s", 6 * 3600.0, 60.0, 30 * 86400.0),
    )
    clock_t.finish()
    agent = _Section("agent", raw.get("agent", {}))
    heartbeat_s = agent.number("heartbeat_s", 60.0, 1.0, 3600.0)
    led_pin = agent.integer("led_pin", None, 0, 27)
    w1_root = agent.path("w1_root", Path("/sys/bus/w1/devices"))
    flush_s = agent.number("shutdown_flush_s", 5.0, 0.0, 300.0)
    agent.finish()

    sensors_raw = raw.get("sensors")
    if sensors_raw is None:
        sensors_raw = _simulated_defaults() if simulate else []
    if not isinstance(sensors_raw, list):
        raise ConfigError("sensors must be an array of tables: [[sensors]]")
    sensors = tuple(_parse_sensor(i, s) for i, s in enumerate(sensors_raw))
    if not sensors:
        raise ConfigError("no [[sensors]] configured: add at least one (see the README)")
    seen: set[str] = set()
    for s in sensors:
        if s.id in seen:
            raise ConfigError(f"sensors: id {s.id!r} is used twice")
        seen.add(s.id)
    top.used.update({"node", "mqtt", "outbox", "clock", "agent", "sensors"})
    top.finish()
    return AgentConfig(
        node_id=node_id,
        mqtt=mqtt,
        outbox=outbox,
        clock=clock,
        sensors=sensors,
        heartbeat_s=heartbeat_s,
        led_pin=led_pin,
        w1_root=w1_root or Path("/sys/bus/w1/devices"),
        shutdown_flush_s=flush_s,
    )


def _parse_mqtt(t: _Section, node_id: str, origins: Mapping[str, str]) -> MqttConfig:
    password = t.text("password", secret=True)
    password_file = t.path("password_file")
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"mqtt.password_file = {str(password_file)!r}: {exc.strerror}"
            ) from None
    ca, cert, key = t.path("ca_file"), t.path("cert_file"), t.path("key_file")
    for name, p in (("ca_file", ca), ("cert_file", cert), ("key_file", key)):
        if p is not None and not p.is_file():
            raise ConfigError(f"mqtt.{name} = {str(p)!r} does not exist")
    if (cert is None) != (key is None):
        raise ConfigError("mqtt.cert_file and mqtt.key_file must be given together")
    if cert is not None and ca is None:
        raise ConfigError("mqtt.cert_file needs mqtt.ca_file (TLS) as well")
    port_default = 8883 if ca is not None else 1883
    port = t.integer("port", port_default, 1, 65535) or port_default
    config = MqttConfig(
        brokers=_parse_brokers(t, port, origins),
        username=t.text("username", node_id),
        password=password,
        keepalive_s=t.integer("keepalive_s", 60, 5, 3600) or 60,
        ca_file=ca,
        cert_file=cert,
        key_file=key,
        max_inflight=t.integer("max_inflight", 100, 1, 1000) or 100,
        puback_timeout_s=t.number("puback_timeout_s", 30.0, 1.0, 3600.0),
    )
    t.finish()
    return config


# --- brokers ----------------------------------------------------------------------------------


def _where(key: str, origins: Mapping[str, str]) -> str:
    """``mqtt.hosts``, or ``mqtt.hosts (EDGE_MQTT_HOSTS)`` when the value came from there."""
    return f"{key} ({origins[key]})" if key in origins else key


def _is_hostname(text: str) -> bool:
    """A DNS name (``gw-1``, ``gw-1.site.lan.``) or an IPv4 address: 1-63 character labels of
    letters, digits, ``_`` and ``-`` (not first or last), 253 characters in all."""
    name = text.removesuffix(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_brokers(t: _Section, port: int, origins: Mapping[str, str]) -> tuple[Broker, ...]:
    """``mqtt.hosts`` (a list, or a comma-separated string from the environment) or ``mqtt.host``.

    A blank ``host`` or ``hosts`` string counts as not set (an empty ``EDGE_MQTT_HOSTS=`` in an
    environment file); neither set means ``localhost``.

    Raises:
        ConfigError: both keys are set, or an entry is not a string, is empty, is not a host
            name or address, has a bad port, or names a broker a second time, or there are
            more than :data:`MAX_BROKERS`; the message names the key and the value.
    """
    host = t.text("host")
    hosts = t.raw("hosts")  # a list, or a string from the environment: checked here
    if isinstance(hosts, str):
        hosts = [part.strip() for part in hosts.split(",")] if hosts.strip() else None
    host_key, hosts_key = _where("mqtt.host", origins), _where("mqtt.hosts", origins)
    if hosts is None:
        if not host or not host.strip():
            return (Broker("localhost", port),)
        return (Broker(_single_host(host_key, host.strip()), port),)
    if host and host.strip():
        raise ConfigError(
            f"{host_key} = {host!r} and {hosts_key} = {hosts!r} are both set: list every "
            "broker in mqtt.hosts and remove mqtt.host"
        )
    if not isinstance(hosts, list):
        raise ConfigError(
            f'{hosts_key} = {hosts!r} must be a list of "host" or "host:port" strings, '
            'e.g. ["gw-1", "gw-2:1884"]'
        )
    if not hosts:
        raise ConfigError(f"{hosts_key} = [] is empty: list at least one broker, or leave it out")
    if len(hosts) > MAX_BROKERS:
        raise ConfigError(
            f"{hosts_key} has {len(hosts)} entries: at most {MAX_BROKERS} brokers (got {hosts!r})"
        )
    brokers: list[Broker] = []
    seen: dict[tuple[str, int], str] = {}
    for index, entry in enumerate(hosts):
        key = hosts_key.replace("mqtt.hosts", f"mqtt.hosts[{index}]", 1)
        broker = _broker_entry(key, entry, port)
        same = (_normal_host(broker.host), broker.port)
        if same in seen:
            raise ConfigError(
                f"{key} = {entry!r} names the same broker as {seen[same]!r} "
                f"({broker}): list each broker once"
            )
        seen[same] = str(entry)
        brokers.append(broker)
    return tuple(brokers)


def _single_host(key: str, host: str) -> str:
    """``mqtt.host``: a host name or address, without a port (that is ``mqtt.port``)."""
    if _is_hostname(host) or _is_ipv6(host):
        return host
    if host.startswith("[") and host.endswith("]") and _is_ipv6(host[1:-1]):
        return host[1:-1]
    raise ConfigError(
        f"{key} = {host!r} is not a host name or IP address: give the port in mqtt.port, "
        'or several brokers as mqtt.hosts = ["gw-1", "gw-2:1884"]'
    )


def _broker_entry(key: str, entry: object, default_port: int) -> Broker:
    """One ``mqtt.hosts`` entry: ``host``, ``host:port``, ``[ipv6]`` or ``[ipv6]:port``."""
    if not isinstance(entry, str):
        raise ConfigError(f'{key} = {entry!r} must be a string: "host" or "host:port"')
    text = entry.strip()
    if not text:
        raise ConfigError(f"{key} = {entry!r} is empty: give a host name or address")
    if "/" in text or any(c.isspace() for c in text):
        raise ConfigError(
            f"{key} = {entry!r} is not a host name or address with an optional port: no "
            "scheme (mqtt://), path or spaces; write gw-1 or gw-1:1883"
        )
    port_text: str | None = None
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
        if match is None or not _is_ipv6(match.group(1)):
            raise ConfigError(
                f"{key} = {entry!r} is not an IPv6 address in brackets: "
                "write [2001:db8::1] or [2001:db8::1]:1883"
            )
        host, port_text = match.group(1), match.group(2)
    elif text.count(":") > 1:
        raise ConfigError(
            f"{key} = {entry!r}: an IPv6 address goes in brackets, with or without a port: "
            "[2001:db8::1] or [2001:db8::1]:1883"
        )
    else:
        host, colon, rest = text.partition(":")
        port_text = rest if colon else None
        if not _is_hostname(host):
            raise ConfigError(
                f'{key} = {entry!r} is not "host" or "host:port": {host!r} is not a host '
                "name or IP address"
            )
    if port_text is None:
        return Broker(host, default_port)
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{key} = {entry!r}: the port {port_text!r} must be 1..65535")
    return Broker(host, int(port_text))


def _normal_host(host: str) -> str:
    """The form two spellings of one host share: ``GW-1.`` and ``gw-1``, ``::1`` and ``0::1``."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower().removesuffix(".")


def _parse_outbox(t: _Section, user_state: bool) -> OutboxConfig:
    default_path = DEFAULT_OUTBOX_PATH
    if user_state:
        state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        default_path = state / "edge-agent" / "outbox.sqlite"
    config = OutboxConfig(
        path=t.path("path", default_path) or default_path,
        max_rows=t.integer("max_rows", 1_000_000, 100, 100_000_000) or 1_000_000,
        max_age_days=t.number("max_age_days", 30.0, 0.01, 3650.0),
        drain_rate_per_s=t.number("drain_rate_per_s", 500.0, 1.0, 100_000.0),
    )
    t.finish()
    return config


def _parse_sensor(index: int, data: object) -> SensorConfig:
    """One ``[[sensors]]`` table, checked against its kind's driver in the registry.

    Raises:
        ConfigError: the id or kind is missing or invalid, a common key or one of the
            driver's fields is mistyped or out of range, a required field is missing, or a
            key belongs to no field of this kind (the message names the kinds that use it).
    """
    t = _Section(f"sensors[{index}]", data)
    sensor_id = t.text("id")
    if sensor_id is None:
        raise ConfigError(f"sensors[{index}].id is missing")
    _check_id(f"sensors[{index}].id", sensor_id)
    kind = t.text("kind")
    if kind is None or kind not in REGISTRY:
        raise ConfigError(
            f"sensors[{index}].kind = {kind!r} must be one of {', '.join(REGISTRY.kinds())}"
        )
    driver = REGISTRY.driver(kind)
    median = t.integer("median_window", 1, 1, 15) or 1
    if median > 1 and median % 2 == 0:
        raise ConfigError(f"sensors[{index}].median_window = {median} must be odd")
    settings: dict[str, object] = {}
    for spec in driver.FIELDS:
        value = _field(t, spec)
        if value is None and spec.required:
            raise ConfigError(f"{t.key(spec.name)} is required for a {kind} ({spec.help})")
        if value is not None:
            settings[spec.name] = value
    driver.settle(t.name, sensor_id, settings)
    interval_s = t.number("interval_s", 30.0, driver.MIN_INTERVAL_S, 86_400.0)
    offset_c = t.number("offset_c", 0.0, -20.0, 20.0)
    for key in sorted(set(t.data) - t.used - COMMON_FIELDS):
        users = REGISTRY.users_of(key)
        if users:
            raise ConfigError(f"{t.key(key)} is only used by {' and '.join(users)} sensors")
    t.finish()
    return SensorConfig(
        id=sensor_id,
        kind=kind,
        interval_s=interval_s,
        offset_c=offset_c,
        median_window=median,
        settings=settings,
    )


def _field(t: _Section, spec: Field) -> object:
    """The value of one driver field (None: not given, and no default)."""
    raw = t.raw(spec.name)
    if raw is None:
        return spec.default
    if spec.parse is not None:
        return spec.parse(t.key(spec.name), raw)
    low = -(2.0**63) if spec.low is None else spec.low
    high = 2.0**63 if spec.high is None else spec.high
    value: object
    if spec.type is bool:
        value = t.flag(spec.name, False)
    elif spec.type is int:
        value = t.integer(spec.name, None, int(low), int(high))
    elif spec.type is float:
        value = t.number(spec.name, 0.0, low, high)
    else:
        value = t.text(spec.name)
    return value


def _simulated_defaults() -> list[dict[str, Any]]:
    return [
        {"id": "sim-1", "kind": "simulated", "interval_s": 5.0, "seed": 1},
        {"id": "sim-2", "kind": "simulated", "interval_s": 5.0, "seed": 2},
        {"id": "sim-3", "kind": "simulated", "interval_s": 5.0, "seed": 3, "humidity": True},
    ]
