"""`pipeline consume` as a real process, so tests can SIGTERM it and kill -9 it."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from tests.harness.procs import ManagedProcess
from tests.harness.rabbit import RabbitBroker


class ConsumerProcess(ManagedProcess):
    """One `python -m pipeline consume` with its log in a temp file."""

    def __init__(
        self,
        broker: RabbitBroker,
        database_url: str,
        *,
        batch_size: int = 500,
        prefetch: int = 1500,
        batch_ms: int = 50,
        metrics_port: int = 0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        fd, name = tempfile.mkstemp(prefix="pipeline-consume-", suffix=".log")
        os.close(fd)
        env = dict(os.environ)
        env.update(
            RABBITMQ_URL=f"amqp://127.0.0.1:{broker.amqp_port}/%2F",
            RABBITMQ_USER=broker.pipeline.username,
            RABBITMQ_PASSWORD=broker.pipeline.password,
            DATABASE_URL=database_url,
            PIPELINE_BATCH_SIZE=str(batch_size),
            PIPELINE_PREFETCH=str(prefetch),
            PIPELINE_BATCH_MS=str(batch_ms),
            PIPELINE_METRICS_PORT=str(metrics_port),
            PIPELINE_LOG_INTERVAL_S="1",
        )
        env.update(extra_env or {})
        super().__init__([sys.executable, "-m", "pipeline", "consume"], Path(name), env)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ConsumerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            print(f"--- pipeline consume log ({self.log_path}) ---\n{self.log[-6000:]}")
        self.close()
