"""Small process and network helpers shared by the server fixtures."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_handed_out: set[int] = set()


def worker_slot() -> tuple[int, int]:
    """(this process's index, how many run at once) under pytest-xdist; (0, 1) without it.

    Resources every worker picks from the one host (ports, subnets, docker's address pools)
    are split by it, so two workers never pick the same one at the same moment.
    """
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    count = max(count, 1)
    return index % count, count


def mine(number: int) -> bool:
    """Whether ``number`` (a port, a subnet's third octet) is in this worker's share."""
    index, count = worker_slot()
    return number % count == index


@contextlib.contextmanager
def host_lock(name: str, directory: Path | None = None) -> Iterator[None]:
    """An exclusive lock held across processes (xdist workers, concurrent runs) on this host,
    e.g. around "find a free subnet, then take it" or "build a cache entry unless it exists"."""
    directory = directory or Path(tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f".tempmon-{name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (net.ipv4.ip_local_port_range)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


# Servers' ports come from below the ephemeral range: a port there is only ever taken by an
# explicit bind. A port from the ephemeral range can become the source port of any outgoing
# connection on the host while its server is down (a broker killed and started again by a
# test), and the server then cannot listen on it again; the more tests run at once, the more
# connections there are to take it.
_SERVER_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port nobody listens on now, outside the ephemeral range, never the same twice in
    this process, and never one another xdist worker could pick (each takes the ports of its
    own residue class)."""
    ephemeral = _ephemeral_ports()
    candidates = [
        port
        for port in _SERVER_PORTS
        if port not in ephemeral and port not in _handed_out and mine(port)
    ]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(
        f"no free TCP port on 127.0.0.1 in {_SERVER_PORTS.start}-{_SERVER_PORTS.stop - 1} "
        f"outside the ephemeral range {ephemeral.start}-{ephemeral.stop - 1}"
    )


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
    """Poll ``check`` until it is true; raise TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process started with start_new_session=True and all its children."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def service_user(name: str) -> pwd.struct_passwd | None:
    """The unprivileged account to run a server as when the tests run as root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise RuntimeError(
            f"running as root, but the system user {name!r} does not exist: "
            "install the Debian package that provides it (tests/run.sh does)"
        ) from exc


def find_executable(name: str, *dirs: str) -> str:
    for directory in dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found in {', '.join(dirs) or 'PATH'}: run tests/run.sh")
    return found


class ManagedProcess:
    """A program under test, its output in a log file, that a test can SIGTERM or kill -9."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env={**env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: nothing flushed, acknowledged or closed."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def signal_terminate(self) -> None:
        """Send SIGTERM without waiting (``terminate`` then waits): stop several at once."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, as docker stop and systemd send; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
