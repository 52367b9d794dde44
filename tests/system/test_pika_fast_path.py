"""The consumer's shortcuts in pika's frame handling change nothing pika does.

`pipeline.consumer._skip_callback_lookup_for_deliveries` answers "no callback" for
`Basic.Deliver`, header and body frames without asking pika's callback registry. On a real
broker, with the shortcut in place, every kind of exchange the consumer relies on still works:
synchronous replies (queue declare, QoS, cancel), deliveries with their properties and
headers, publisher confirms (Basic.Ack frames are registered callbacks), returns of unroutable
mandatory messages, a message with an empty body (no body frame at all) and one split over
several body frames. `pipeline.consumer._coalesce_writes` sends pika's buffered frames in one
system call: the broker gets the same bytes in the same order. `pipeline.frames` reads the
registered consumers' deliveries off a real broker's stream exactly as pika does, while pika goes
on handling everything else on the same connection.
"""

from __future__ import annotations

import contextlib

import pika
import pika.exceptions
import pytest

from pipeline.consumer import _coalesce_writes, _skip_callback_lookup_for_deliveries
from pipeline.frames import DeliveryFrames
from tests.harness import RabbitBroker

pytestmark = pytest.mark.system


def test_deliveries_confirms_returns_and_replies_work_with_the_shortcut(
    rabbit: RabbitBroker,
) -> None:
    # A small frame_max splits the larger bodies over several body frames.
    params = pika.URLParameters(rabbit.amqp_url(rabbit.admin) + "?frame_max=4096")
    with contextlib.closing(pika.BlockingConnection(params)) as conn:
        _skip_callback_lookup_for_deliveries(conn)
        channel = conn.channel()
        channel.confirm_delivery()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_qos(prefetch_count=50)
        bodies = [b"", b"x" * 8000, *(f"message {i}".encode() for i in range(20))]
        for i, body in enumerate(bodies):
            channel.basic_publish(
                "",
                queue,
                body,
                pika.BasicProperties(headers={"n": i}, delivery_mode=2),
                mandatory=True,
            )  # confirmed: a Basic.Ack frame came back through the registry
        with pytest.raises(pika.exceptions.UnroutableError):
            channel.basic_publish("", "no-such-queue", b"lost", mandatory=True)
        got: list[tuple[int, bytes]] = []

        def on_message(
            _ch: object, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
        ) -> None:
            assert props.headers is not None
            got.append((props.headers["n"], body))
            channel.basic_ack(method.delivery_tag)

        tag = channel.basic_consume(queue, on_message)
        deadline = 200
        while len(got) < len(bodies) and deadline:
            conn.process_data_events(time_limit=0.05)
            deadline -= 1
        channel.basic_cancel(tag)  # a synchronous reply again
        assert got == list(enumerate(bodies))
        assert channel.queue_declare(queue, passive=True).method.message_count == 0


def test_coalesced_writes_send_every_frame_in_order_in_fewer_system_calls(
    rabbit: RabbitBroker,
) -> None:
    """`_coalesce_writes` joins pika's buffered frames before its send loop: the broker gets
    the same messages, in order, whole (also bodies split over several frames, and empty
    ones), through far fewer ``send()`` calls than there are frames."""
    params = pika.URLParameters(rabbit.amqp_url(rabbit.admin) + "?frame_max=4096")
    with contextlib.closing(pika.BlockingConnection(params)) as conn:
        _skip_callback_lookup_for_deliveries(conn)
        _coalesce_writes(conn)
        transport = getattr(conn, "_impl")._transport  # noqa: B009
        sends: list[int] = []
        send = transport._sigint_safe_send

        def counted(sock: object, data: bytes) -> int:
            sent = int(send(sock, data))
            sends.append(sent)
            return sent

        transport._sigint_safe_send = counted
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        bodies = [b"", b"x" * 8000, *(f"message {i}".encode() for i in range(50))]
        # method + header frames, and one body frame per 4 KiB or less (none for b"")
        frames = sum(2 + -(-len(body) // (4096 - 8)) for body in bodies)
        impl = getattr(channel, "_impl")  # noqa: B009 - publishes that do not wait
        sends.clear()
        for i, body in enumerate(bodies):
            impl.basic_publish("", queue, body, pika.BasicProperties(headers={"n": i}))
        for _ in range(100):
            if transport.get_write_buffer_size() == 0:
                break
            conn.process_data_events(time_limit=0.05)
        assert transport.get_write_buffer_size() == 0
        assert 1 <= len(sends) < frames // 10, (len(sends), frames)
        got: list[tuple[int, bytes]] = []
        for _ in range(200):
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                if len(got) == len(bodies):
                    break
                conn.process_data_events(time_limit=0.05)
                continue
            assert props.headers is not None
            got.append((props.headers["n"], body))
        assert got == list(enumerate(bodies))


def test_the_fast_frame_path_delivers_what_pika_delivers_on_a_real_broker(
    rabbit: RabbitBroker,
) -> None:
    """Two queues with the same messages on one connection: one consumer registered with
    `DeliveryFrames`, one left to pika (each on its own channel, as delivery tags are per
    channel). Both get the same bodies, properties, routing keys and
    order (bodies split over body frames, empty ones, header tables), while publisher confirms,
    synchronous replies and acks go on through pika on that connection."""
    params = pika.URLParameters(rabbit.amqp_url(rabbit.admin) + "?frame_max=4096")
    with contextlib.closing(pika.BlockingConnection(params)) as conn:
        frames = DeliveryFrames.install(conn)
        assert frames is not None
        _skip_callback_lookup_for_deliveries(conn)
        _coalesce_writes(conn)
        publisher = conn.channel()
        publisher.confirm_delivery()
        consumer = conn.channel()
        consumer.basic_qos(prefetch_count=500)
        fast_channel = conn.channel()
        fast_channel.basic_qos(prefetch_count=500)
        fast_q = consumer.queue_declare("", exclusive=True).method.queue
        pika_q = consumer.queue_declare("", exclusive=True).method.queue
        exchange = "fast-path-test"
        consumer.exchange_declare(exchange, "topic", auto_delete=True)
        for queue in (fast_q, pika_q):
            consumer.queue_bind(queue, exchange, "sensors.#")
        messages = [
            (b"", pika.BasicProperties()),
            (b"x" * 8000, pika.BasicProperties(delivery_mode=2)),
            ("\u00b0C".encode() * 1000, pika.BasicProperties(content_type="application/json")),
            *(
                (
                    f'{{"seq": {i}}}'.encode(),
                    pika.BasicProperties(
                        headers={"n": i, "t": {"deep": [i, "x"]}}, message_id=f"m{i}"
                    ),
                )
                for i in range(300)
            ),
        ]
        for i, (body, props) in enumerate(messages):
            publisher.basic_publish(exchange, f"sensors.n{i % 3}.s1", body, props)  # confirmed

        fast: list[tuple[str, str, dict[str, object], bytes]] = []
        slow: list[tuple[str, str, dict[str, object], bytes]] = []
        last_fast = [0]

        def on_fast(tag: int, ex: str, key: str, props: pika.BasicProperties, body: bytes) -> None:
            fast.append((ex, key, vars(props), body))
            last_fast[0] = tag

        def on_slow(
            _ch: object, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
        ) -> None:
            slow.append((method.exchange, method.routing_key, vars(props), body))
            consumer.basic_ack(method.delivery_tag)

        frames.register(fast_channel.channel_number, "fast", on_fast)
        fast_channel.basic_consume(fast_q, on_slow, consumer_tag="fast")  # never called
        consumer.basic_consume(pika_q, on_slow, consumer_tag="slow")
        acked = 0
        for _ in range(400):
            if len(fast) + len(slow) >= 2 * len(messages):
                break
            conn.process_data_events(time_limit=0.05)
            frames.raise_error()
            if last_fast[0] > acked:
                acked = last_fast[0]
                fast_channel.basic_ack(acked, multiple=True)
        assert len(fast) == len(messages)
        assert fast == slow
        assert [body for *_, body in fast] == [body for body, _ in messages]
        assert fast[5][2]["headers"] == {"n": 2, "t": {"deep": [2, "x"]}}
        assert frames.active
        assert frames.delivered == len(messages)
        fast_channel.basic_cancel("fast")  # synchronous replies still work
        consumer.basic_cancel("slow")
        for queue in (fast_q, pika_q):
            assert consumer.queue_declare(queue, passive=True).method.message_count == 0
