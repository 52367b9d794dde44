"""A commit that neither succeeds nor fails is reported, not waited on in silence.

The connection's own timeouts (tests/system/test_db_timeouts.py) end a commit on a dead
network path; this is the backstop for what they cannot see (a database or a proxy that
accepts the connection and never answers): past ``stall_after_s`` the writer's state is logged
as an error and ``pipeline_database_up`` drops to 0 until the commit returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from pipeline.consumer import Batch, Writer
from pipeline.decode import NodeStatus, Reading
from pipeline.metrics import DATABASE_UP, Metrics
from pipeline.store import BatchResult
from tests.harness.procs import wait_for


class _HangingStore:
    """A store whose write waits until released, as on a database that stopped answering."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(
        self, readings: Sequence[Reading], statuses: Sequence[NodeStatus] = ()
    ) -> BatchResult:
        self.entered.set()
        self.release.wait(30)
        return BatchResult(inserted=len(readings), duplicates=0, statuses=len(statuses))


class _Session:
    closed = False

    def __init__(self) -> None:
        self.committed = threading.Event()

    def on_committed(self, _batch: Batch, _result: BatchResult) -> None:
        self.committed.set()

    def fail(self, reason: str) -> None:
        raise AssertionError(reason)


def test_a_commit_with_no_reply_is_reported_once_and_its_end_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _HangingStore()
    writer = Writer(store, Metrics(interval_s=3600), stall_after_s=0.3)  # type: ignore[arg-type]
    writer.start()
    session = _Session()
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.consumer"):
            DATABASE_UP.set(1)
            writer.submit(Batch(session=session))  # type: ignore[arg-type]
            assert store.entered.wait(5)
            writer.check_stalled()
            assert "database not answering" not in caplog.text  # not yet: 0.3 s
            time.sleep(0.4)
            for _ in range(3):  # the AMQP thread asks every turn; one error per stall
                writer.check_stalled()
            stalls = [r for r in caplog.records if "database not answering" in r.getMessage()]
            assert len(stalls) == 1
            assert stalls[0].levelno == logging.ERROR
            assert REGISTRY.get_sample_value("pipeline_database_up") == 0
            store.release.set()
            assert session.committed.wait(5)
            wait_for("the answer logged", lambda: "answered again" in caplog.text, 5)
            assert REGISTRY.get_sample_value("pipeline_database_up") == 1
    finally:
        store.release.set()
        writer.stop()
        writer.join(5)
