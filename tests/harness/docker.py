"""A private Docker Engine for the tests, and stand-ins for the official images it cannot pull.

``DockerEngine`` starts Debian's ``dockerd`` on its own socket, data root, exec root and pid
file in a temp directory, never the machine's own daemon, and stops it (with every container
it ran) afterwards. It leaves the host's firewall alone (``--iptables=false``) and uses a
bridge of its own for its default network, so it never takes ``docker0``: containers reach each
other on their compose network, published ports are served by docker-proxy on the host, and
containers have no route out (a build needs none: the images carry what they install).

No container registry is reachable here, so ``build_standins`` makes the images our compose
file and Dockerfiles name from Debian 13 packages: each is a debootstrapped root with a recipe
run in it (``tests/standins/<name>/root.sh``), imported into the engine, then built on with the
Dockerfile next to the recipe, which keeps the parts of the official image's contract our
files rely on. They are tagged with exactly the official names, so the compose file runs
unmodified; what runs is Debian's RabbitMQ 4.0, PostgreSQL 17 and Python 3.13.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.harness.debian import (
    CACHE_DIR,
    cache_lock,
    debootstrap_tarball,
    dpkg_architecture,
    mounts_under,
    recipe_tarball,
)
from tests.harness.procs import REPO, host_lock, mine, wait_for, worker_slot

__all__ = [
    "STANDIN_SUITE",
    "STANDIN_TAGS",
    "DockerEngine",
    "DockerError",
    "StandIns",
    "build_standins",
    "wheelhouse",
]

STANDINS = REPO / "tests" / "standins"
# Debian 13: RabbitMQ 4.0, PostgreSQL 17, Python 3.13 (what users run is RabbitMQ 4).
STANDIN_SUITE = "trixie"
STANDIN_PYTHON = "3.13"
# Exactly the names docker-compose.yml and the Dockerfiles use.
STANDIN_TAGS = {
    "rabbitmq": "rabbitmq:4-management",
    "postgres": "postgres:17",
    "python": "python:3.12-slim",
}


class DockerError(RuntimeError):
    """A docker command failed; the message holds the command and its output."""


class DockerEngine:
    """A private ``dockerd`` in a temp directory, stopped and removed by ``close()``.

    Raises:
        DockerError: dockerd is not installed, the tests do not run as root, or it did not
            come up (the tail of its log is in the message).
    """

    def __init__(self, *, keep: bool = False) -> None:
        self.keep = keep
        # Short: the engine's unix sockets live under it (108 characters at most).
        self.dir = Path(tempfile.mkdtemp(prefix="tempmon-docker-"))
        self.socket = self.dir / "docker.sock"
        self.log_path = self.dir / "dockerd.log"
        self.config_dir = self.dir / "config"
        self._proc: subprocess.Popen[bytes] | None = None
        self.bridge: str | None = None
        self.start_seconds = 0.0

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for docker and docker compose against this engine only."""
        env = dict(os.environ)
        env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.config_dir))
        env.pop("DOCKER_CONTEXT", None)
        env.update(extra or {})
        return env

    def start(self, timeout: float = 90) -> None:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not Path(dockerd).is_file():
            raise DockerError("dockerd is not installed: run tests/run.sh (it installs docker.io)")
        if os.geteuid() != 0:
            raise DockerError("a private dockerd needs root (CI runs the tests as root)")
        began = time.monotonic()
        self.config_dir.mkdir(exist_ok=True)
        (self.config_dir / "config.json").write_text("{}\n")
        self.bridge = _make_bridge()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    dockerd,
                    "--host",
                    self.host,
                    "--data-root",
                    str(self.dir / "data"),
                    "--exec-root",
                    str(self.dir / "exec"),
                    "--pidfile",
                    str(self.dir / "dockerd.pid"),
                    # Leave the host's firewall and its bridges alone.
                    "--iptables=false",
                    "--ip6tables=false",
                    "--ip-masq=false",
                    # BuildKit runs RUN steps on the default network: give it our own bridge.
                    f"--bridge={self.bridge}",
                    # The networks compose creates: from a pool of this engine's own, since
                    # docker's default pools would give two engines on one host (two xdist
                    # workers) the same 172.x subnets.
                    f"--default-address-pool=base={address_pool()},size=24",
                    "--storage-driver=overlay2",
                    "--log-level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        def up() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise DockerError(f"dockerd exited ({self._proc.returncode}):\n{self.log_tail()}")
            return self.docker("version", check=False, timeout=10).returncode == 0

        try:
            wait_for("the private dockerd to answer", up, timeout, interval=0.25)
        except TimeoutError as exc:
            self.close()
            raise DockerError(f"{exc}:\n{self.log_tail()}") from exc
        self.start_seconds = time.monotonic() - began

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 300,
        input_text: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine.

        Raises:
            DockerError: ``check`` is set and the command failed.
        """
        result = subprocess.run(
            ["docker", *args],
            env=self.env(env),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
        if check and result.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args[:6])} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def image_exists(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, timeout=30).returncode == 0

    def compose_version(self) -> str:
        """The compose plugin's version, e.g. ``2.26.1``.

        Raises:
            DockerError: the plugin is missing (tests/run.sh installs it).
        """
        result = self.docker("compose", "version", "--short", check=False, timeout=30)
        if result.returncode != 0:
            raise DockerError(
                "docker compose (v2) is not installed: run tests/run.sh, which installs "
                f"Debian 13's docker-compose as a CLI plugin:\n{result.stderr}"
            )
        return result.stdout.strip().lstrip("v")

    def close(self) -> None:
        """Remove every container, stop dockerd, unmount what it left; safe to call twice."""
        if self._proc is not None:
            if self._proc.poll() is None:
                ids = self.docker("ps", "-aq", check=False, timeout=60).stdout.split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, check=False, timeout=180)
                # Removes the networks' bridges from the host.
                self.docker("network", "prune", "-f", check=False, timeout=60)
                # dockerd stops the containerd it started; only what is left is killed.
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(60)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc = None
        if self.bridge is not None:
            subprocess.run(["ip", "link", "delete", self.bridge], check=False, capture_output=True)
            self.bridge = None
        left = mounts_under(self.dir)
        for mount_point in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
        if not self.keep and not mounts_under(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DockerEngine:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def address_pool() -> str:
    """The /16 this engine's networks come from: one per xdist worker (10.216.0.0/16 for the
    first or only one), so engines running at once never hand out the same subnet."""
    index, _ = worker_slot()
    return f"10.{216 + index}.0.0/16"


def _make_bridge() -> str:
    """A new Linux bridge with a /24 that no interface or route of the host uses.

    Raises:
        DockerError: no free subnet among the candidates, or ``ip`` failed.
    """
    # Under the lock, and only among this worker's candidates: two engines starting at once
    # would otherwise both read the routes, then both take the same subnet.
    with host_lock("subnets"):
        return _make_bridge_locked()


def _make_bridge_locked() -> str:
    used = (
        subprocess.run(
            ["ip", "-o", "-4", "route", "show", "table", "all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        + subprocess.run(
            ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
        ).stdout
    )
    name = f"tmpdk{os.urandom(3).hex()}"
    for third in range(16, 250):
        net = f"10.213.{third}"
        if not mine(third) or f"{net}." in used:
            continue
        commands = [
            ["ip", "link", "add", name, "type", "bridge"],
            ["ip", "addr", "add", f"{net}.1/24", "dev", name],
            ["ip", "link", "set", name, "up"],
        ]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                subprocess.run(["ip", "link", "delete", name], check=False, capture_output=True)
                raise DockerError(f"{' '.join(command)} failed: {done.stderr}")
        return name
    raise DockerError("no free 10.213.x.0/24 subnet for the private engine's bridge")


# --- the wheelhouse baked into the python stand-in ----------------------------------------------


# Our own packages: the images install them from the copied directories (contract/ on the same
# pip command line as the wing), never from an index, where the name could be anyone's.
LOCAL_PACKAGES = ("contract", "edge", "pipeline")


def _requirement_name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement (``Foo_Bar[x]>=1`` -> ``foo-bar``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _project_requirements() -> list[str]:
    """What the gateway images download from the index: the edge and pipeline packages'
    dependencies and the build backend pip needs to build our packages from source (the images
    install ./contract with ./edge or ./pipeline), minus our own packages (tempmon-contract).
    """
    local: set[str] = set()
    wanted: list[str] = []
    for package in LOCAL_PACKAGES:
        meta = tomllib.loads((REPO / package / "pyproject.toml").read_text(encoding="utf-8"))
        local.add(_requirement_name(meta["project"]["name"]))
        wanted += meta["project"]["dependencies"]
        wanted += meta["build-system"]["requires"]
    return sorted({req for req in wanted if _requirement_name(req) not in local})


def _wheel_platforms() -> list[str]:
    machine = platform.machine()
    return [
        f"manylinux_2_{minor}_{machine}" for minor in (39, 36, 34, 31, 28, 27, 24, 17, 12, 5)
    ] + [f"manylinux2014_{machine}", f"linux_{machine}"]


def wheelhouse(python: str = STANDIN_PYTHON) -> Path:
    """Wheels of the pinned dependencies for ``python`` on this architecture, cached.

    Downloaded from the package index with this venv's pip, binary only, with the repository's
    constraints, so the images install exactly what CI and the Pi install.

    Raises:
        DockerError: pip could not fetch a wheel (its output is in the message).
    """
    constraints = (REPO / "constraints.txt").read_text(encoding="utf-8")
    requirements = _project_requirements()
    key = f"{python}\0{platform.machine()}\0{constraints}\0{requirements}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = CACHE_DIR / f"wheels-cp{python.replace('.', '')}-{digest}"
    if (target / ".complete").is_file():
        return target
    with cache_lock(target.name):
        if not (target / ".complete").is_file():
            _download_wheels(python, requirements, target)
    return target


def _download_wheels(python: str, requirements: list[str], target: Path) -> None:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE_DIR))
    try:
        platforms = [arg for plat in _wheel_platforms() for arg in ("--platform", plat)]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--dest",
                str(work),
                "--only-binary=:all:",
                "--implementation",
                "cp",
                "--python-version",
                python,
                *platforms,
                "-c",
                str(REPO / "constraints.txt"),
                *requirements,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            raise DockerError(
                f"pip download of the wheelhouse failed:\n{result.stdout}{result.stderr}"
            )
        (work / ".complete").write_text("\n".join(requirements) + "\n")
        if target.exists():
            shutil.rmtree(target)
        work.replace(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the stand-in images ------------------------------------------------------------------------


@dataclass
class StandIns:
    """The stand-in images built into an engine, and how long each phase took (seconds)."""

    tags: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)


def _root_tag(name: str, tarball: Path) -> str:
    digest = re.sub(r"[^a-z0-9]", "", tarball.stem.rsplit("-", 1)[-1].lower())
    return f"tempmon-standin-root/{name}:{digest}"


def build_standins(engine: DockerEngine, names: Iterable[str] = tuple(STANDIN_TAGS)) -> StandIns:
    """Build (or find) the stand-in images named ``names`` in ``engine``.

    Raises:
        DockerError: a build failed.
        RuntimeError: debootstrap or a recipe failed.
    """
    built = StandIns(tags={})
    began = time.monotonic()
    base = debootstrap_tarball(STANDIN_SUITE, dpkg_architecture(), "")
    built.seconds["debootstrap"] = time.monotonic() - began
    for name in names:
        tag = STANDIN_TAGS[name]
        t0 = time.monotonic()
        tarball = recipe_tarball(name, base, STANDINS / name / "root.sh")
        t1 = time.monotonic()
        root_tag = _root_tag(name, tarball)
        if not engine.image_exists(root_tag):
            engine.docker("import", str(tarball), root_tag, timeout=600)
        t2 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"standin-{name}-") as tmp:
            context = Path(tmp) / "context"
            shutil.copytree(STANDINS / name, context)
            if name == "python":
                shutil.copytree(wheelhouse(), context / "wheels")
            engine.docker(
                "build",
                "--quiet",
                "--build-arg",
                f"ROOT={root_tag}",
                "--tag",
                tag,
                str(context),
                timeout=900,
                env={"DOCKER_BUILDKIT": "0"},
            )
        t3 = time.monotonic()
        built.tags[name] = tag
        built.seconds[f"{name}: root"] = t1 - t0
        built.seconds[f"{name}: import"] = t2 - t1
        built.seconds[f"{name}: build"] = t3 - t2
    return built
