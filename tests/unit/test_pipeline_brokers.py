"""RABBITMQ_URL as a list of cluster nodes: parsing, refusals, redaction and the connect order.

The connection tests use real sockets and the real pika: a port nobody listens on refuses at
once, so a whole round of failed nodes takes milliseconds.
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
from collections import Counter

import pytest

from pipeline.brokers import BrokersUnreachableError, connect, connection_order, describe_error
from pipeline.cli import main
from pipeline.config import MAX_RABBITMQ_URLS, ConsumerSettings
from pipeline.errors import ConfigError
from pipeline.origin import derive_key

NODES = [
    "amqp://rabbitmq:5672/%2F",
    "amqp://rabbitmq-2:5672/%2F",
    "amqp://rabbitmq-3:5672/%2F",
]
PASSWORD = "s3cr/et,pa#ss"


def _settings(**env: str) -> ConsumerSettings:
    return ConsumerSettings.from_env({"DATABASE_URL": "postgresql://db/tempmon", **env})


def _refused(**env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _settings(**env)
    message = str(caught.value)
    for secret in ("s3cr", "hunter2", "pa#ss", "pa%23ss"):
        assert secret not in message
    return message


# --- parsing -------------------------------------------------------------------------------------


def test_a_list_gets_the_credentials_in_every_url() -> None:
    settings = _settings(
        RABBITMQ_URL=" , ".join(NODES),  # spaces around the commas are fine
        RABBITMQ_USER="pipeline",
        RABBITMQ_PASSWORD=PASSWORD,
    )
    escaped = "s3cr%2Fet%2Cpa%23ss"
    assert settings.rabbitmq_urls == (
        f"amqp://pipeline:{escaped}@rabbitmq:5672/%2F",
        f"amqp://pipeline:{escaped}@rabbitmq-2:5672/%2F",
        f"amqp://pipeline:{escaped}@rabbitmq-3:5672/%2F",
    )
    assert settings.rabbitmq_url == settings.rabbitmq_urls[0]
    assert "s3cr" not in repr(settings.dead_letter_key)


def test_one_url_is_a_list_of_one() -> None:
    settings = _settings(RABBITMQ_URL="amqp://pipeline:pw@rabbitmq:5672/%2F")
    assert settings.rabbitmq_urls == ("amqp://pipeline:pw@rabbitmq:5672/%2F",)
    assert settings.rabbitmq_url == "amqp://pipeline:pw@rabbitmq:5672/%2F"
    assert _settings().rabbitmq_urls == ("amqp://localhost:5672/%2F",)


def test_a_comma_in_the_password_of_one_url_does_not_split_it() -> None:
    """A single URL with a comma in its password worked before lists did; it still does."""
    settings = _settings(RABBITMQ_URL="amqp://pipeline:pa,ss@rabbitmq/%2F")
    assert settings.rabbitmq_urls == ("amqp://pipeline:pa,ss@rabbitmq/%2F",)
    assert settings.dead_letter_key == derive_key("pa,ss")
    two = _settings(RABBITMQ_URL="amqp://p:a,b@rabbitmq/%2F,amqp://p:a,b@rabbitmq-2/%2F")
    assert two.rabbitmq_urls == ("amqp://p:a,b@rabbitmq/%2F", "amqp://p:a,b@rabbitmq-2/%2F")


def test_settings_made_directly_take_one_url_or_the_list() -> None:
    one = ConsumerSettings(rabbitmq_url="amqp://localhost/", database_url="postgresql://db/t")
    assert one.rabbitmq_urls == ("amqp://localhost/",)
    many = ConsumerSettings(rabbitmq_urls=tuple(NODES), database_url="postgresql://db/t")
    assert many.rabbitmq_url == NODES[0]
    both = ConsumerSettings(
        rabbitmq_url=NODES[0], rabbitmq_urls=tuple(NODES), database_url="postgresql://db/t"
    )
    assert both.rabbitmq_urls == tuple(NODES)
    with pytest.raises(ConfigError, match="rabbitmq_url must be the first of rabbitmq_urls"):
        ConsumerSettings(
            rabbitmq_url=NODES[1], rabbitmq_urls=tuple(NODES), database_url="postgresql://db/t"
        )
    with pytest.raises(ConfigError, match=r"entry 2 of 2 .* same vhost"):
        ConsumerSettings(
            rabbitmq_urls=("amqp://a/%2F", "amqp://b/other"), database_url="postgresql://db/t"
        )


# --- refusals: variable, position, value, never the password -------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "amqp://rabbitmq/%2F,http://pipeline:hunter2@rabbitmq-2/%2F",
            # One entry (only amqp:// and amqps:// start one); the password stays hidden.
            (
                "RABBITMQ_URL='amqp://rabbitmq/%2F,http:***@rabbitmq-2/%2F' lists a URL that does "
                "not start with amqp:// or amqps://"
            ),
        ),
        (
            "amqp://rabbitmq/%2F,amqp://pipeline:hunter2@rabbitmq-2:56x2/%2F",
            (
                "RABBITMQ_URL entry 2 of 2 ('amqp://pipeline:***@rabbitmq-2:56x2/%2F') has a port "
                "that is not a number in 1..65535"
            ),
        ),
        (
            "amqp://rabbitmq/%2F,amqp://rabbitmq-2/%2F,",
            "RABBITMQ_URL entry 2 of 2 ('amqp://rabbitmq-2/%2F,') holds a comma outside",
        ),
        (
            "amqp://rabbitmq/%2F,rabbitmq-2:5672",
            (
                "RABBITMQ_URL='amqp://rabbitmq/%2F,rabbitmq-2:5672' holds a comma outside its "
                "password: separate the URLs with commas, each one starting with amqp://"
            ),
        ),
        ("pipeline:hunter2@rabbitmq", "RABBITMQ_URL='***@rabbitmq' must start with amqp://"),
        ("", "RABBITMQ_URL='' is empty"),
        (
            "amqp://p:hunter2@rabbitmq/%2F,amqp://p:hunter2@rabbitmq-2/tempmon",
            (
                "RABBITMQ_URL entry 2 of 2 ('amqp://p:***@rabbitmq-2/tempmon') names the vhost "
                "'tempmon', entry 1 names '/': the URLs are the nodes of one cluster and must all "
                "name the same vhost"
            ),
        ),
        (
            "amqp://p:hunter2@rabbitmq/%2F,amqp://p:hunter2@RabbitMQ:5672",
            (
                "RABBITMQ_URL entry 2 of 2 ('amqp://p:***@RabbitMQ:5672') is the node "
                "rabbitmq:5672 again (entry 1): list each node once"
            ),
        ),
        (
            "amqp://p:hunter2@rabbitmq/%2F,amqp://p:s3cr@rabbitmq-2/%2F",
            (
                "RABBITMQ_URL entry 2 of 2 ('amqp://p:***@rabbitmq-2/%2F') has another user or "
                "password than entry 1"
            ),
        ),
        (
            "amqp://p:hunter2@rabbitmq/%2F,amqp://rabbitmq-2/%2F",
            "RABBITMQ_URL entry 2 of 2 ('amqp://rabbitmq-2/%2F') has another user or password",
        ),
        (
            "amqp://a/,amqp://p:s3cr/et@rabbitmq-2/%2F",
            (
                "RABBITMQ_URL entry 2 of 2 ('amqp://p:***@rabbitmq-2/%2F') cannot be read as "
                "user:password@host:port/vhost: percent-escape a '/', '?' or '#' in the password"
            ),
        ),
        (
            "amqp://p:hunter2@rabbitmq/%2F?heartbeat=often",
            (
                "RABBITMQ_URL='amqp://p:***@rabbitmq/%2F?heartbeat=often' is refused by pika: "
                "ValueError: Invalid heartbeat value 'often'"
            ),
        ),
        (
            "amqp://p:hunter2@[::1/%2F",
            "RABBITMQ_URL='amqp://p:***@[::1/%2F' is not a URL",
        ),
    ],
)
def test_a_bad_list_is_refused_naming_the_entry(value: str, expected: str) -> None:
    assert expected in _refused(RABBITMQ_URL=value)


def test_credentials_given_once_make_the_urls_agree() -> None:
    """RABBITMQ_PASSWORD replaces each URL's password, so they cannot disagree."""
    settings = _settings(
        RABBITMQ_URL="amqp://p:one@rabbitmq/%2F,amqp://p:two@rabbitmq-2/%2F",
        RABBITMQ_PASSWORD="three",
    )
    assert [u.split("@")[0] for u in settings.rabbitmq_urls] == ["amqp://p:three"] * 2


def test_at_most_sixteen_urls() -> None:
    urls = [f"amqp://rabbitmq-{n}:5672/%2F" for n in range(MAX_RABBITMQ_URLS + 1)]
    assert len(_settings(RABBITMQ_URL=",".join(urls[:-1])).rabbitmq_urls) == MAX_RABBITMQ_URLS
    assert "RABBITMQ_URL lists 17 URLs: at most 16" in _refused(RABBITMQ_URL=",".join(urls))


# --- the dead-letter key ------------------------------------------------------------------------


def test_the_dead_letter_key_is_the_single_urls_and_ignores_the_order() -> None:
    single = _settings(RABBITMQ_URL=NODES[0], RABBITMQ_USER="pipeline", RABBITMQ_PASSWORD=PASSWORD)
    assert single.dead_letter_key == derive_key(PASSWORD)
    for order in itertools.permutations(NODES):
        listed = _settings(
            RABBITMQ_URL=",".join(order), RABBITMQ_USER="pipeline", RABBITMQ_PASSWORD=PASSWORD
        )
        assert listed.dead_letter_key == single.dead_letter_key
    in_urls = [u.replace("amqp://", "amqp://pipeline:pw%2C1@") for u in NODES]
    keys = {
        _settings(RABBITMQ_URL=",".join(order)).dead_letter_key
        for order in itertools.permutations(in_urls)
    }
    assert keys == {derive_key("pw,1")}


# --- the order nodes are tried in ----------------------------------------------------------------


def test_every_order_is_a_shuffle_of_the_list() -> None:
    rng = random.Random(7)
    firsts = Counter(connection_order(NODES, rng=rng)[0] for _ in range(3000))
    assert set(firsts) == set(NODES)
    assert min(firsts.values()) > 800  # about 1000 each: replicas spread over the nodes
    for _ in range(50):
        assert sorted(connection_order(NODES, rng=rng)) == sorted(NODES)


def test_the_node_just_lost_is_tried_last() -> None:
    rng = random.Random(11)
    for lost in NODES:
        orders = [connection_order(NODES, lost=lost, rng=rng) for _ in range(300)]
        assert all(order[-1] == lost and sorted(order) == sorted(NODES) for order in orders)
        # The others still come in either order.
        assert len({tuple(order) for order in orders}) == 2


def test_alone_the_lost_node_is_tried_again_and_an_unknown_one_changes_nothing() -> None:
    assert connection_order(NODES[:1], lost=NODES[0]) == NODES[:1]
    assert sorted(connection_order(NODES, lost="amqp://elsewhere/")) == sorted(NODES)
    assert connection_order([], lost=None) == []


# --- connecting, against real sockets ------------------------------------------------------------


def _closed_ports(n: int) -> list[int]:
    """Ports nobody listens on (bound, read, released: the kernel refuses them at once)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_connect_tries_every_node_and_names_each_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    urls = [f"amqp://pipeline:hunter2@127.0.0.1:{port}/%2F" for port in _closed_ports(3)]
    caplog.set_level(logging.INFO)
    with pytest.raises(BrokersUnreachableError) as caught:
        connect(urls, lost=urls[1])
    message = str(caught.value)
    assert message.startswith("no RabbitMQ node of 3 reachable: ")
    for url in urls:
        assert url.replace("hunter2", "***") in message
    assert "Connection refused" in message
    tried = [r.getMessage() for r in caplog.records if r.name == "pipeline.brokers"]
    assert len(tried) == 3
    assert tried[2].startswith(
        f"RabbitMQ node unreachable or refused node={urls[1].replace('hunter2', '***')} "
        "tried=3/3 error="
    )
    everything = message + "\n".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in everything
    # pika's own account of each failure (several ERROR lines, a traceback) is not shown.
    assert not [r for r in caplog.records if r.name.startswith("pika") and r.levelno > 10]


def test_one_unreachable_url_says_so_plainly() -> None:
    [port] = _closed_ports(1)
    with pytest.raises(BrokersUnreachableError, match=r"^RabbitMQ unreachable or refused: amqp"):
        connect(f"amqp://127.0.0.1:{port}/%2F")


def test_connection_errors_are_described_without_the_password() -> None:
    url = "amqp://pipeline:pa%2Fss@rabbitmq/%2F"
    text = describe_error(ConnectionRefusedError("refused by pa/ss and pa%2Fss"), url)
    assert text == "ConnectionRefusedError('refused by *** and ***')"


def test_the_dead_letter_commands_try_every_node(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ports = _closed_ports(2)
    monkeypatch.setenv("RABBITMQ_URL", ",".join(f"amqp://127.0.0.1:{p}/%2F" for p in ports))
    monkeypatch.setenv("RABBITMQ_USER", "pipeline")
    monkeypatch.setenv("RABBITMQ_PASSWORD", "hunter2")
    for command in (["dead", "list"], ["dead", "replay", "--dry-run"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith("pipeline: no RabbitMQ node of 2 reachable: ")
        assert all(f"amqp://pipeline:***@127.0.0.1:{p}/%2F" in err for p in ports)
        assert "hunter2" not in err


def test_a_user_without_a_password_is_a_refused_login_not_a_crash() -> None:
    """pika raises TypeError on ``amqp://user@host``; the broker refuses an empty password."""
    from pipeline.brokers import url_parameters  # noqa: PLC0415

    params = url_parameters("amqp://pipe%40line@rabbitmq/%2F")
    assert (params.credentials.username, params.credentials.password) == ("pipe@line", "")
    assert params.host == "rabbitmq"
    [port] = _closed_ports(1)
    with pytest.raises(BrokersUnreachableError):
        connect(f"amqp://pipeline@127.0.0.1:{port}/%2F")


# --- when to reconnect ---------------------------------------------------------------------------


def test_a_lost_node_is_followed_at_once_by_the_others_then_the_back_off() -> None:
    from pipeline.consumer import Backoff, Reconnects  # noqa: PLC0415

    reconnects = Reconnects(3, Backoff(initial=0.5, cap=30.0))
    # Each node lost after a while of consuming: straight on to the next, the lost one last.
    for node in NODES:
        assert reconnects.ended(node=node, consuming=True, lasted_s=5) is None
        assert reconnects.lost == node
    # A fourth loss within the minute: the sessions keep dying, so the back-off applies.
    delay = reconnects.ended(node=NODES[0], consuming=True, lasted_s=5)
    assert delay is not None
    assert 0.25 <= delay <= 0.5
    assert reconnects.attempt == 1
    # A whole round refused (no node accepted): back-off, growing, and the lost node is kept.
    delays = [reconnects.ended(node=None, consuming=False, lasted_s=0.01) for _ in range(8)]
    assert all(d is not None for d in delays)
    assert 15 <= max(d for d in delays if d is not None) <= 30
    assert reconnects.lost == NODES[0]
    assert reconnects.attempt == 9
    # A session that consumed for more than a minute resets everything: at once again.
    assert reconnects.ended(node=NODES[1], consuming=True, lasted_s=61) is None
    assert (reconnects.attempt, reconnects.failovers, reconnects.lost) == (0, 1, NODES[1])


def test_a_session_that_never_consumed_waits_for_the_back_off() -> None:
    """Connected, then refused (a missing queue, a permission): no tight reconnect loop."""
    from pipeline.consumer import Reconnects  # noqa: PLC0415

    reconnects = Reconnects(2)
    delays = [reconnects.ended(node=NODES[0], consuming=False, lasted_s=0.02) for _ in range(3)]
    assert all(d is not None and d > 0 for d in delays)
    assert reconnects.lost == NODES[0]


def test_one_node_alone_is_retried_once_at_once() -> None:
    from pipeline.consumer import Reconnects  # noqa: PLC0415

    reconnects = Reconnects(1)
    assert reconnects.ended(node=NODES[0], consuming=True, lasted_s=300) is None
    assert reconnects.ended(node=None, consuming=False, lasted_s=0.01) is not None
    assert reconnects.ended(node=NODES[0], consuming=True, lasted_s=10) is not None


def test_settings_made_in_code_take_a_list_only_as_a_list() -> None:
    with pytest.raises(ConfigError, match="holds more than one URL: give them one by one"):
        ConsumerSettings(rabbitmq_url=",".join(NODES), database_url="postgresql://db/t")
