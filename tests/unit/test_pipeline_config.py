"""pipeline.config: passwords never reach a log line, and the dead-letter signing key.

``redact`` used ``urlsplit``, which ends the host part at the first ``/``, ``?`` or ``#``: a
password holding one of them looked like no password at all, and the URL was logged whole.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from pipeline.config import ConsumerSettings, has_password, redact
from pipeline.errors import ConfigError
from pipeline.origin import derive_key

SECRET_PARTS = ["s3cr/et", "pa#ss", "wh?at", "a@b", "c:d", "%2F", "x y", "ü"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://pipeline:s3cret@rabbitmq:5672/%2F", "amqp://pipeline:***@rabbitmq:5672/%2F"),
        ("amqp://pipeline:s3cr/et@rabbitmq:5672/%2F", "amqp://pipeline:***@rabbitmq:5672/%2F"),
        ("amqp://pipeline:pa#ss@rabbitmq/%2F", "amqp://pipeline:***@rabbitmq/%2F"),
        ("amqp://pipeline:wh?at@rabbitmq/%2F", "amqp://pipeline:***@rabbitmq/%2F"),
        ("amqp://pipeline:a@b@rabbitmq/%2F", "amqp://pipeline:***@rabbitmq/%2F"),
        ("amqp://pipeline:c:d@rabbitmq/%2F", "amqp://pipeline:***@rabbitmq/%2F"),
        ("amqp://pipeline:/?#@:@rabbitmq/%2F", "amqp://pipeline:***@rabbitmq/%2F"),
        ("amqps://p:%2F%23%3F%40@rabbitmq:5671/%2F", "amqps://p:***@rabbitmq:5671/%2F"),
        (
            "postgresql://pipeline:x y ü@db:5432/tempmon",
            "postgresql://pipeline:***@db:5432/tempmon",
        ),
        ("postgresql://pipeline:@db/tempmon", "postgresql://pipeline:***@db/tempmon"),
        (
            "postgresql://pipeline@db/tempmon?sslmode=require&password=s3cret",
            "postgresql://pipeline@db/tempmon?sslmode=require&password=***",
        ),
        (
            "postgresql://u:one@db/t?sslpassword=two&application_name=x",
            "postgresql://u:***@db/t?sslpassword=***&application_name=x",
        ),
        # No password: unchanged.
        ("amqp://pipeline@rabbitmq:5672/%2F", "amqp://pipeline@rabbitmq:5672/%2F"),
        ("amqp://rabbitmq:5672/%2F", "amqp://rabbitmq:5672/%2F"),
        ("postgresql:///tempmon", "postgresql:///tempmon"),
        ("postgresql://pipeline@db/tempmon", "postgresql://pipeline@db/tempmon"),
        ("not a url", "not a url"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected
    assert has_password(url) == (expected != url)


@pytest.mark.parametrize("password", [*SECRET_PARTS, "".join(SECRET_PARTS), "/", "#", "?", "@"])
@pytest.mark.parametrize("escaped", [False, True])
def test_no_password_survives_redaction(password: str, escaped: bool) -> None:
    written = quote(password, safe="") if escaped else password
    url = f"amqp://pipeline:{written}@rabbitmq:5672/%2F"
    assert redact(url) == "amqp://pipeline:***@rabbitmq:5672/%2F"
    assert has_password(url)


def test_a_bad_rabbitmq_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        ConsumerSettings.from_env(
            {"RABBITMQ_URL": "http://pipeline:s3cr/et@rabbitmq/", "DATABASE_URL": "postgresql://x"}
        )
    assert "s3cr" not in str(refused.value)
    assert "***" in str(refused.value)


def _settings(**env: str) -> ConsumerSettings:
    return ConsumerSettings.from_env({"DATABASE_URL": "postgresql://db/tempmon", **env})


def test_the_signing_key_defaults_to_one_derived_from_the_amqp_password() -> None:
    from_password = _settings(RABBITMQ_USER="pipeline", RABBITMQ_PASSWORD="pa/ss#w?rd@x")
    from_url = _settings(RABBITMQ_URL="amqp://pipeline:pa%2Fss%23w%3Frd%40x@rabbitmq:5672/%2F")
    assert from_password.dead_letter_key == derive_key("pa/ss#w?rd@x")
    assert from_url.dead_letter_key == from_password.dead_letter_key
    # Derived, never the password itself, and not shown by repr.
    assert b"pa/ss" not in (from_password.dead_letter_key or b"")
    assert "dead_letter_key" not in repr(from_password)
    other = _settings(RABBITMQ_USER="pipeline", RABBITMQ_PASSWORD="another")
    assert other.dead_letter_key != from_password.dead_letter_key


def test_an_explicit_signing_key_outlives_the_amqp_password() -> None:
    key = "k" * 32
    one = _settings(RABBITMQ_PASSWORD="first", PIPELINE_DEAD_LETTER_KEY=key)
    two = _settings(RABBITMQ_PASSWORD="second", PIPELINE_DEAD_LETTER_KEY=key)
    assert one.dead_letter_key == two.dead_letter_key == derive_key(key)


def test_a_short_signing_key_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as refused:
        _settings(PIPELINE_DEAD_LETTER_KEY="short-secret")
    assert "PIPELINE_DEAD_LETTER_KEY is 12 characters long" in str(refused.value)
    assert "short-secret" not in str(refused.value)


def test_without_any_secret_there_is_no_signing_key() -> None:
    assert _settings().dead_letter_key is None
    assert _settings(RABBITMQ_URL="amqp://pipeline@rabbitmq/%2F").dead_letter_key is None


# --- database timeouts (issue 13) ----------------------------------------------------------------

_BASE_ENV = {"RABBITMQ_URL": "amqp://localhost/", "DATABASE_URL": "postgresql://u@db/t"}


def test_database_timeouts_default_to_bounded_waits() -> None:
    from pipeline.db import DatabaseTimeouts  # noqa: PLC0415

    settings = ConsumerSettings.from_env(_BASE_ENV)
    timeouts = settings.database_timeouts
    assert timeouts == DatabaseTimeouts(connect_s=10, tcp_s=30, statement_s=30, lock_s=10)
    assert timeouts.connect_args() == {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
        "options": (
            "-c statement_timeout=30000 -c lock_timeout=10000 "
            "-c idle_in_transaction_session_timeout=60000 -c tcp_user_timeout=30000 "
            "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
        ),
    }


def test_database_timeouts_from_the_environment() -> None:
    settings = ConsumerSettings.from_env(
        {
            **_BASE_ENV,
            "PIPELINE_DB_CONNECT_TIMEOUT_S": "3",
            "PIPELINE_DB_TCP_TIMEOUT_S": "1",
            "PIPELINE_DB_STATEMENT_TIMEOUT_S": "0",
            "PIPELINE_DB_LOCK_TIMEOUT_S": "0",
        }
    )
    args = settings.database_timeouts.connect_args()
    assert args["connect_timeout"] == 3
    assert (args["keepalives_idle"], args["keepalives_interval"]) == (1, 1)
    assert args["tcp_user_timeout"] == 1000
    assert args["options"] == (
        "-c statement_timeout=0 -c lock_timeout=0 "
        "-c idle_in_transaction_session_timeout=1000 -c tcp_user_timeout=1000 "
        "-c tcp_keepalives_idle=1 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3"
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PIPELINE_DB_CONNECT_TIMEOUT_S", "ten", "PIPELINE_DB_CONNECT_TIMEOUT_S='ten' is not an"),
        ("PIPELINE_DB_CONNECT_TIMEOUT_S", "0", "PIPELINE_DB_CONNECT_TIMEOUT_S=0 is outside 1..600"),
        ("PIPELINE_DB_TCP_TIMEOUT_S", "0", "PIPELINE_DB_TCP_TIMEOUT_S=0 is outside 1..600"),
        ("PIPELINE_DB_TCP_TIMEOUT_S", "1.5", "PIPELINE_DB_TCP_TIMEOUT_S='1.5' is not an integer"),
        (
            "PIPELINE_DB_STATEMENT_TIMEOUT_S",
            "-1",
            "PIPELINE_DB_STATEMENT_TIMEOUT_S=-1 is outside 0..86400",
        ),
        ("PIPELINE_DB_LOCK_TIMEOUT_S", "30s", "PIPELINE_DB_LOCK_TIMEOUT_S='30s' is not an integer"),
    ],
)
def test_a_bad_database_timeout_is_named_with_its_value(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        ConsumerSettings.from_env({**_BASE_ENV, name: value})
    assert message in str(caught.value)


def test_database_timeouts_are_checked_when_settings_are_made_directly() -> None:
    with pytest.raises(ConfigError, match=r"DatabaseTimeouts\.connect_s=0 is outside 1\.\.86400"):
        ConsumerSettings(
            rabbitmq_url="amqp://localhost/",
            database_url="postgresql://db/t",
            db_connect_timeout_s=0,
        )
