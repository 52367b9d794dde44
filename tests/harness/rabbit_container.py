"""RabbitMQ 4 for the tests: the rabbitmq:4-management image run exactly as docker compose runs it.

The compose file's rabbitmq service, as one ``docker run`` on the private engine: the same
mounts (gateway/rabbitmq/ files into conf.d, definitions, users.sh and start.sh), the same
entry point (start.sh), user and fixed hostname, a named volume for its data; with ``tls``,
as gateway/compose.tls.yml changes it. Ports are published on 127.0.0.1 only, on free ports, so
the tests reach it as they reach the native broker. Users are made by users.sh through
``docker exec``, as the README tells an operator to, so a hang of the CLI there hangs a test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

from tests.harness.docker import STANDIN_TAGS, DockerEngine, DockerError
from tests.harness.procs import port_open, wait_for
from tests.harness.rabbit import GATEWAY, RabbitBroker

__all__ = ["RabbitContainer"]

# The uid of the rabbitmq user in the official image (and in our stand-in).
_RABBITMQ_UID = 999


class RabbitContainer(RabbitBroker):
    """A RabbitMQ 4 node in a container, with the interface of the native ``RabbitBroker``.

    ``stop()`` is ``docker stop`` (SIGTERM to start.sh, which stops the node in order), ``kill()``
    is ``docker kill -s KILL`` (the whole container at once), ``start()`` starts the same
    container again with its volume, as a restart policy would.
    """

    def __init__(
        self,
        engine: DockerEngine,
        *,
        image: str = STANDIN_TAGS["rabbitmq"],
        keep: bool = False,
        tls: bool = False,
    ) -> None:
        self.engine = engine
        self.image = image
        self.name = f"tempmon-rabbit4-{os.getpid()}-{os.urandom(3).hex()}"
        self.volume = f"{self.name}-data"
        self._created = False
        super().__init__(keep=keep, tls=tls)

    # -- configuration -------------------------------------------------------------------
    def _write_config(self) -> None:
        # The configuration files are mounted from gateway/ as compose mounts them; only the
        # TLS certificates are made here, by gateway/tls/make-certs.sh as an operator would,
        # with the key readable by the broker's user (README: chown 999 server.key).
        if self.tls:
            self._make_certs()
            os.chown(self.tls_dir / "broker" / "server.key", _RABBITMQ_UID, -1)

    def _run_args(self) -> list[str]:
        mounts = {
            GATEWAY / "rabbitmq.conf": "/etc/rabbitmq/conf.d/10-gateway.conf",
            GATEWAY / "enabled_plugins": "/etc/rabbitmq/enabled_plugins",
            GATEWAY / "advanced.config": "/etc/rabbitmq/advanced.config",
            GATEWAY / "definitions.json": "/etc/rabbitmq/definitions.json",
            GATEWAY / "users.sh": "/etc/rabbitmq/gateway/users.sh",
            GATEWAY / "start.sh": "/etc/rabbitmq/gateway/start.sh",
        }
        # As gateway/compose.tls.yml: tls.conf, only certs/broker/ mounted, 1883 not published.
        ports = {
            self.amqp_port: 5672,
            self.management_port: 15672,
            self.prometheus_port: 15692,
        }
        if self.tls:
            mounts[GATEWAY / "tls.conf"] = "/etc/rabbitmq/conf.d/20-tls.conf"
            mounts[self.tls_dir / "broker"] = "/etc/rabbitmq/tls"
            ports[self.mqtt_tls_port] = 8883
        else:
            ports[self.mqtt_port] = 1883
        args = [
            "run",
            "--detach",
            "--name",
            self.name,
            "--hostname",
            "rabbitmq",
            "--user",
            "rabbitmq",
            "--env",
            f"RABBITMQ_ADMIN_USER={self.admin.username}",
            "--env",
            f"RABBITMQ_ADMIN_PASSWORD={self.admin.password}",
            "--env",
            f"PIPELINE_AMQP_USER={self.pipeline.username}",
            "--env",
            f"PIPELINE_AMQP_PASSWORD={self.pipeline.password}",
            "--volume",
            f"{self.volume}:/var/lib/rabbitmq",
        ]
        for source, target in mounts.items():
            args += ["--volume", f"{source}:{target}:ro"]
        for host_port, container_port in ports.items():
            args += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
        return [*args, self.image, "sh", "/etc/rabbitmq/gateway/start.sh"]

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        if not self._created:
            return False
        state = self.engine.docker(
            "inspect", "--format", "{{.State.Running}}", self.name, check=False, timeout=30
        )
        return state.stdout.strip() == "true"

    def start(self, timeout: float = 180) -> None:
        """Start the container (create it the first time) and wait until start.sh is done."""
        if self.running:
            return
        began = time.monotonic()
        if self._created:
            self.engine.docker("start", self.name, timeout=60)
        else:
            self.engine.docker(*self._run_args(), timeout=120)
            self._created = True

        def ready() -> bool:
            self._fail_if_exited()
            done = self.engine.docker(
                "exec", self.name, "test", "-f", "/tmp/gateway-users-applied", check=False
            )
            if done.returncode != 0:
                return False
            with contextlib.suppress(Exception), contextlib.closing(self.connection()):
                return True
            return False

        try:
            wait_for("RabbitMQ 4 in its container, users applied", ready, timeout, interval=0.5)
        except Exception as exc:
            logs = self.logs()[-4000:]
            self.kill()
            raise RuntimeError(f"{exc}; container log:\n{logs}") from exc
        self.boot_seconds.append(time.monotonic() - began)

    def logs(self) -> str:
        if not self._created:
            return ""
        done = self.engine.docker("logs", self.name, check=False, timeout=60)
        return done.stdout + done.stderr

    @property
    def pid(self) -> int:
        raise RuntimeError("the containerised broker has no process of this test run")

    def _fail_if_exited(self) -> bool:
        state = self.engine.docker(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.name, check=False
        ).stdout.split()
        if state and state[0] in {"exited", "dead"}:
            tail = self.logs()[-3000:]
            raise RuntimeError(f"the broker's container exited ({state[1]}):\n{tail}")
        return False

    def stop(self, timeout: float = 60) -> None:
        """``docker stop``: SIGTERM to start.sh, which stops the node in order."""
        if not self.running:
            return
        self.engine.docker("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 30)
        wait_for("AMQP port released", lambda: not self._port_served(), 30)

    def kill(self) -> None:
        """``docker kill -s KILL``: every process of the container dies at once."""
        if not self.running:
            return
        self.engine.docker("kill", "--signal", "KILL", self.name, check=False, timeout=60)
        wait_for("the container to stop", lambda: not self.running, 30)
        wait_for("AMQP port released", lambda: not self._port_served(), 30)

    def _port_served(self) -> bool:
        # docker-proxy listens on the host while the container runs, whatever the node does.
        return port_open(self.amqp_port)

    def close(self) -> None:
        """Remove the container and its volume; safe to call twice."""
        if self._created:
            if self.keep:
                (self.dir / "server.out").write_text(self.logs())
            self.engine.docker("rm", "--force", "--volumes", self.name, check=False, timeout=120)
            self.engine.docker("volume", "rm", "--force", self.volume, check=False, timeout=60)
            self._created = False
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- administration ------------------------------------------------------------------
    def ctl(self, *args: str, input_text: str | None = None) -> str:
        """rabbitmqctl inside the container, as the rabbitmq user."""
        return self._exec(["rabbitmqctl", "-q", *args], input_text)

    def users(self, *args: str, input_text: str | None = None) -> str:
        """gateway/rabbitmq/users.sh inside the container, as the README has an operator run it
        (``docker compose exec -T rabbitmq sh /etc/rabbitmq/gateway/users.sh ...``)."""
        return self._exec(["sh", "/etc/rabbitmq/gateway/users.sh", *args], input_text)

    def _exec(self, argv: list[str], input_text: str | None) -> str:
        try:
            done = self.engine.docker(
                "exec",
                *(["--interactive"] if input_text is not None else []),
                "--user",
                "rabbitmq",
                self.name,
                *argv,
                input_text=input_text,
                timeout=120,
            )
        except DockerError as exc:
            raise RuntimeError(str(exc)) from exc
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(argv[:3])} hung for {exc.timeout:.0f} s") from exc
        return done.stdout
