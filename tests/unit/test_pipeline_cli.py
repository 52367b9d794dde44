"""The `pipeline` command refuses a password in ``--database-url``.

A command line is readable by every user of the machine (``ps``, /proc/<pid>/cmdline) and is
kept in shell history; DATABASE_URL, PGPASSWORD and ~/.pgpass are not.
"""

from __future__ import annotations

import pytest

from pipeline.cli import main

WITH_PASSWORDS = [
    "postgresql://postgres:s3cret@db:5432/tempmon",
    "postgresql://postgres:s3cr/et@db/tempmon",
    "postgresql://postgres@db/tempmon?password=s3cret",
]


@pytest.mark.parametrize("url", WITH_PASSWORDS)
@pytest.mark.parametrize("command", [["migrate"], ["maintain"], ["consume"], ["summary"]])
def test_a_password_in_database_url_is_refused(
    command: list[str], url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert "--database-url" in err
    assert "DATABASE_URL" in err
    assert "PGPASSWORD" in err
    assert "~/.pgpass" in err
    assert "s3cr" not in err


def test_database_url_without_a_password_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import cli  # noqa: PLC0415

    seen: list[str] = []
    monkeypatch.setattr("pipeline.migrate.migrate", lambda url: seen.append(url) or [])
    monkeypatch.setattr("pipeline.retention.settle", lambda *_a, **_k: ([], []))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = "postgresql://postgres@127.0.0.1:1/tempmon"
    assert cli.main(["migrate", "--database-url", url]) == 0
    assert seen == [url]


def test_database_url_from_the_environment_may_hold_a_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline import cli  # noqa: PLC0415

    seen: list[str] = []
    monkeypatch.setattr("pipeline.migrate.migrate", lambda url: seen.append(url) or [])
    monkeypatch.setattr("pipeline.retention.settle", lambda *_a, **_k: ([], []))
    url = "postgresql://postgres:s3cret@127.0.0.1:1/tempmon"
    monkeypatch.setenv("DATABASE_URL", url)
    assert cli.main(["migrate"]) == 0
    assert seen == [url]


def test_dead_list_shows_an_unproved_origin_as_a_claim(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.deadletters import DeadLetter  # noqa: PLC0415

    common: dict[str, object] = {
        "reason": "r",
        "rejected_at": "2025-06-01T12:00:00+00:00",
        "deaths": 1,
        "size": 10,
        "preview": "{}",
    }
    dead = [
        DeadLetter(
            queue="readings",
            routing_key="sensors.pi-a.t1",
            origin="signed",
            origin_note="signed by this pipeline",
            claimed_routing_key="",
            **common,  # type: ignore[arg-type]
        ),
        DeadLetter(
            queue="",
            routing_key="",
            origin="unverified",
            origin_note="not signed by a pipeline, and ...",
            claimed_routing_key="sensors.pi-victim.t1",
            **common,  # type: ignore[arg-type]
        ),
    ]
    monkeypatch.setattr("pipeline.deadletters.list_dead", lambda *_a, **_k: dead)
    monkeypatch.setenv("RABBITMQ_URL", "amqp://pipeline:pw@127.0.0.1:1/%2F")
    assert main(["dead", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2025-06-01T12:00:00+00:00  sensors.pi-a.t1  (from readings, 10 bytes)"
    assert out[1] == "    origin: signed by this pipeline"
    assert out[4] == "2025-06-01T12:00:00+00:00  ?  (claims sensors.pi-victim.t1; 10 bytes)"
    assert out[5] == "    origin: NOT VERIFIED: not signed by a pipeline, and ..."
