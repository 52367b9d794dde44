"""What it costs the broker to dead-letter a message, by route, apart from any consumer's work.

    .venv/bin/python -m bench.deadletter [--messages 30000] [--repeat 3] [--runs ack,copy,...]

Starts a private RabbitMQ (the test harness, configured by gateway/), and for each route
queues the same unusable messages (the kinds `bench.drain` mixes in) into a fresh quorum
queue, takes them off with the barest pika consumer (prefetch 3000, no decoding), and meters
the broker's CPU and the consumer's until every message is settled and, where it is
dead-lettered, sits in the dead-letter queue:

  ack        acknowledged (a multiple ack every 500): what delivering a message costs; the
             baseline the others are compared with
  copy       a copy of each into the dead-letter quorum queue with the headers our consumer
             writes (reason, origin, time, program, signature; built once per kind, so the
             consumer's share is the least a copy can cost), in confirm mode, and the
             originals acknowledged once their copies are confirmed: our consumer's route
  ours       the same copies made by our consumer's own code (pipeline.deadletters'
             DeadLetterPublisher: properties signed afresh for each copy, frames marshalled
             by the pipeline, written as the consumer writes them, confirms settled as the
             consumer settles them): what our copy costs the consumer, with no decoding
             (pika's own dispatch gives each delivery new properties, so the consumer's
             cache of encoded kept headers never hits; these deliveries carry no headers)
  copy-bare  the same copies without any header (delivery mode 2 only): what our headers add
  copy-mix   the copy route for one message in ten, the others acknowledged: the broker's
             price of a copy when copies are as sparse as in bench.drain's hostile mix
  nack       basic_nack(requeue=False), multiple every 500, on a queue with
             x-dead-letter-strategy at-least-once: the broker dead-letters each message
             itself, with its own confirms; no reason travels with it
  nack-once  the same with the default strategy, at-most-once (no confirms between the
             queues: a message the target does not take is lost): for reference only

Per route: the broker's and the consumer's CPU per message, and per dead-lettered message
the broker's CPU beyond delivering the messages (the route less ``ack``). Medians over the rounds,
which alternate the routes. Compare with `bench.drain`'s hostile run: a hostile message may
cost all parties together at most (1 / 0.9 - 0.9) / 0.1 = 2.11 times a clean reading for
the hostile run to keep 0.9 of the clean rate (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pika
import pika.channel
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from bench.cpu import CpuMeter
from bench.drain import PREFETCH, quiesce, unusable_messages
from pipeline.consumer import _coalesce_writes, _Settlement
from pipeline.deadletters import DeadLetterPublisher, Delivery, copy_properties
from pipeline.origin import derive_key
from tests.harness import RabbitBroker
from tests.harness.procs import wait_for

SOURCE = "dl-bench"
DEAD = "dl-bench.dead"
ACK_EVERY = 500
MIX_EVERY = 10  # copy-mix: one message in ten is copied, as in bench.drain's hostile mix
ROUTES = ("ack", "copy", "ours", "copy-bare", "copy-mix", "nack", "nack-once")


def _declare(broker: RabbitBroker, route: str) -> None:
    """A fresh, empty source and dead-letter queue, both quorum, for ``route``."""
    args: dict[str, object] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": DEAD,
        "x-overflow": "reject-publish",  # at-least-once dead-lettering requires it
    }
    if route != "nack-once":
        args["x-dead-letter-strategy"] = "at-least-once"
    with contextlib.closing(broker.connection(broker.admin)) as conn:
        channel = conn.channel()
        for queue in (SOURCE, DEAD):
            channel.queue_delete(queue)
        channel.queue_declare(DEAD, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_declare(SOURCE, durable=True, arguments=args)


def _queue(broker: RabbitBroker, bodies: list[bytes]) -> None:
    props = pika.BasicProperties(delivery_mode=2)
    with contextlib.closing(broker.connection(broker.admin)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()  # one round trip each, but untimed; nothing gets lost
        for body in bodies:
            channel.basic_publish("", SOURCE, body, props)
    broker.wait_depth(SOURCE, len(bodies), timeout=120)


def _copy_properties(bodies: list[bytes]) -> dict[bytes, pika.BasicProperties]:
    """Per kind of message, the properties our consumer gives its copy (pipeline.deadletters)."""
    key = derive_key("bench")
    props = pika.BasicProperties(delivery_mode=2)
    return {
        body: copy_properties(
            Delivery(0, "readings", "sensors.node-0.s0", props, body),
            f"reason of the kind of {body[:20]!r}: a sentence about as long as the decoder's",
            key=key,
            now=datetime.now(UTC),
        )
        for body in set(bodies)
    }


class _Confirms:
    """Publisher confirms as they come: ``confirmed`` is how many copies, counted from the
    first, are all confirmed (one frame may confirm many, and RabbitMQ does not promise to
    confirm in order). A refused copy (basic.nack) or one with nowhere to go (basic.return)
    is never counted as confirmed, so its original is never acknowledged; ``check`` fails the
    run on it."""

    def __init__(self, conn: pika.BlockingConnection, channel: BlockingChannel) -> None:
        self.impl: pika.channel.Channel = getattr(channel, "_impl")  # noqa: B009
        self.confirmed = 0
        self._singles: set[int] = set()  # confirmed out of order, above ``confirmed``
        self.refused: str | None = None
        selected: list[bool] = []
        self.impl.add_on_return_callback(self._on_return)
        self.impl.confirm_delivery(self._on, callback=lambda _frame: selected.append(True))
        while not selected:
            conn.process_data_events(time_limit=0.1)

    def _on(self, frame: pika.frame.Method) -> None:  # type: ignore[type-arg]
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self.refused = f"the broker refused copy {method.delivery_tag} (basic.nack)"
            return
        tag = int(method.delivery_tag or 0)
        if method.multiple:
            self.confirmed = max(self.confirmed, tag)
        else:
            self._singles.add(tag)
        while self.confirmed + 1 in self._singles:
            self.confirmed += 1
        self._singles = {t for t in self._singles if t > self.confirmed}

    def _on_return(self, *_args: object) -> None:
        self.refused = "a copy had no queue to go to (basic.return)"

    def check(self) -> None:
        if self.refused is not None:
            raise RuntimeError(self.refused)


def _drain(
    broker: RabbitBroker, route: str, n: int, copies: dict[bytes, pika.BasicProperties]
) -> None:
    """Take ``n`` messages off the source queue and settle each by ``route`` (as the admin:
    the bench's queues are outside the pipeline account's permissions)."""
    with contextlib.closing(broker.connection(broker.admin)) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=PREFETCH)
        confirms = _Confirms(conn, conn.channel()) if route.startswith("copy") else None
        bare = pika.BasicProperties(delivery_mode=2)
        every = MIX_EVERY if route == "copy-mix" else 1  # which messages are copied
        copied: list[int] = []  # the delivery tag of each copied message, in copy order
        acked = got = tag = 0

        def ack_confirmed() -> None:
            """Acknowledge, as our consumer does, up to the first copy still unconfirmed."""
            nonlocal acked
            assert confirms is not None  # the copy routes only
            confirms.check()
            waiting = confirms.confirmed < len(copied)
            bound = copied[confirms.confirmed] - 1 if waiting else tag
            if bound > acked:
                channel.basic_ack(bound, multiple=True)
                acked = bound

        for delivery in _deliveries(channel, route):
            if delivery is None:  # a pause: the copies' confirms may let more be acknowledged
                if confirms is not None:
                    ack_confirmed()
                continue
            got += 1
            method, _props, body = delivery
            tag = int(method.delivery_tag)
            if confirms is not None:
                if got % every == 0:
                    props = bare if route == "copy-bare" else copies[body]
                    confirms.impl.basic_publish("", DEAD, body, props, mandatory=True)
                    copied.append(tag)
                if got % ACK_EVERY == 0:
                    ack_confirmed()
            elif got % ACK_EVERY == 0 or got == n:
                if route == "ack":
                    channel.basic_ack(tag, multiple=True)
                else:
                    channel.basic_nack(tag, multiple=True, requeue=False)
            if got >= n:
                if confirms is not None:
                    _last_acks(conn, channel, confirms, len(copied), tag)
                break
        channel.cancel()


_PAUSE_S = 0.05  # a consumer's loop turns this often when nothing is delivered
_IDLE_S = 30.0  # a route fails after this long with nothing delivered


def _deliveries(
    channel: BlockingChannel, route: str
) -> Iterator[tuple[pika.spec.Basic.Deliver, pika.BasicProperties, bytes] | None]:
    """The source queue's deliveries as (method, properties, body), and None for each pause
    of ``_PAUSE_S`` with nothing delivered; fails after ``_IDLE_S`` of nothing."""
    idle_since: float | None = None
    for method, props, body in channel.consume(SOURCE, inactivity_timeout=_PAUSE_S):
        if method is not None:
            idle_since = None
            yield method, props, body
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since > _IDLE_S:
            raise RuntimeError(f"{route}: nothing delivered for {_IDLE_S:.0f} s")
        yield None


def _last_acks(
    conn: pika.BlockingConnection,
    channel: BlockingChannel,
    confirms: _Confirms,
    copies: int,
    last_tag: int,
) -> None:
    """Wait for every copy's confirm, then acknowledge everything up to ``last_tag``."""
    deadline = time.monotonic() + 60
    while confirms.confirmed < copies:
        confirms.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{copies - confirms.confirmed} copies unconfirmed")
        conn.process_data_events(time_limit=0.005)
    confirms.check()
    channel.basic_ack(last_tag, multiple=True)


def _drain_ours(broker: RabbitBroker, n: int) -> None:
    """Our consumer's copy path: each message copied by DeadLetterPublisher with a reason and
    a signature made for it, the originals acknowledged (a multiple ack every 500) once their
    copies are confirmed."""
    key = derive_key("bench")
    reason = "reason of a rejected message: a sentence about as long as the decoder's"
    with contextlib.closing(broker.connection(broker.admin)) as conn:
        _coalesce_writes(conn)  # as `pipeline consume` sends: one send() per turn, not per frame
        channel = conn.channel()
        channel.basic_qos(prefetch_count=PREFETCH)
        publisher = DeadLetterPublisher(channel, conn, timeout_s=30)
        settlement = _Settlement()  # the consumer's own: no ack past an unconfirmed copy
        got = 0
        for delivered in _deliveries(channel, "ours"):
            if delivered is not None:
                got += 1
                method, props, body = delivered
                tag = int(method.delivery_tag)
                settlement.hold(tag)
                publisher.dead_letter(
                    Delivery(tag, SOURCE, "sensors.node-0.s0", props, body), reason, DEAD, key=key
                )
            _settle(publisher, channel, settlement)
            # On a pause as well: the confirms may let more be acknowledged.
            if delivered is None or settlement.bound(None) - settlement.acked >= ACK_EVERY:
                _ack(channel, settlement)
            if got >= n:
                break
        deadline = time.monotonic() + 60
        while publisher.outstanding:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ours: {publisher.outstanding} copies unconfirmed")
            conn.process_data_events(time_limit=0.005)
            _settle(publisher, channel, settlement)
        _ack(channel, settlement)
        channel.cancel()


def _settle(
    publisher: DeadLetterPublisher, channel: BlockingChannel, settlement: _Settlement
) -> None:
    """Release each delivery whose copy the broker confirmed meanwhile."""
    for tag, confirmed in publisher.settle(channel):
        if not confirmed:
            raise RuntimeError(f"ours: the broker refused the copy of delivery {tag}")
        settlement.release(tag, ready=True)


def _ack(channel: BlockingChannel, settlement: _Settlement) -> None:
    """One multiple ack up to the first delivery whose copy is unconfirmed, if any is new."""
    bound = settlement.bound(None)
    if bound > settlement.acked:
        channel.basic_ack(bound, multiple=True)
        settlement.acked = bound


def one_run(
    broker: RabbitBroker, route: str, bodies: list[bytes], copies: dict[bytes, pika.BasicProperties]
) -> dict[str, float]:
    """One route on ``bodies``: CPU seconds per message of each party, and messages/s."""
    n = len(bodies)
    expected = dead_lettered(route, n)
    _declare(broker, route)
    _queue(broker, bodies)
    quiesce(broker)
    meter = CpuMeter({"consumer": [os.getpid()]}, {"RabbitMQ": [broker.pid]})
    meter.start()
    began = time.perf_counter()
    if route == "ours":
        _drain_ours(broker, n)
    else:
        _drain(broker, route, n, copies)
    if route.startswith("nack"):
        # The broker's own dead-lettering goes on after the nacks: the run ends when every
        # message is in the dead-letter queue (its count lags up to about a second). A copy
        # route is done when its copies are confirmed: they are in the queue then.
        with contextlib.closing(broker.connection(broker.admin)) as conn:
            channel = conn.channel()

            def arrived() -> bool:
                ok = channel.queue_declare(DEAD, passive=True)
                return int(ok.method.message_count) >= expected

            wait_for(f"{route}: {expected} messages in {DEAD}", arrived, 120, interval=0.01)
    elapsed = time.perf_counter() - began
    cpu = meter.stop()
    time.sleep(1.5)  # a quorum queue's counts lag: every message settled, each once
    left, dead = broker.depth(SOURCE), broker.depth(DEAD)
    if left or dead != expected:
        raise RuntimeError(f"{route}: {left} messages left in {SOURCE}, {dead} in {DEAD}")
    return {
        "broker_us": cpu["RabbitMQ"] / n * 1e6,
        "consumer_us": cpu["consumer"] / n * 1e6,
        "rate": n / elapsed,
        "dead_share": expected / n,
    }


def dead_lettered(route: str, n: int) -> int:
    """How many of ``n`` messages ``route`` dead-letters."""
    if route == "ack":
        return 0
    return n // MIX_EVERY if route == "copy-mix" else n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", default=",".join(ROUTES), help=f"routes: {','.join(ROUTES)}")
    args = parser.parse_args()
    routes = [r for r in args.runs.split(",") if r]
    unknown = set(routes) - set(ROUTES)
    if unknown or "ack" not in routes:
        parser.error(f"--runs: {sorted(unknown) or 'ack is the baseline and must run'}")
    if args.messages < ACK_EVERY or args.repeat < 1:
        parser.error(f"--messages must be at least {ACK_EVERY}, --repeat at least 1")
    bodies = unusable_messages(args.messages)
    copies = _copy_properties(bodies)
    results: dict[str, list[dict[str, float]]] = {r: [] for r in routes}
    with RabbitBroker() as broker:
        for round_ in range(1, args.repeat + 1):
            for route in routes:
                r = one_run(broker, route, bodies, copies)
                results[route].append(r)
                print(
                    f"round {round_} {route:9} {r['rate']:8.0f} msg/s  broker "
                    f"{r['broker_us']:5.1f} us/msg  consumer {r['consumer_us']:5.1f} us/msg",
                    flush=True,
                )
    report(args.messages, args.repeat, results)
    return 0


def report(n: int, repeat: int, results: dict[str, list[dict[str, float]]]) -> None:
    def median(route: str, field: str) -> float:
        return statistics.median(r[field] for r in results[route])

    base = median("ack", "broker_us")
    print(f"\nDead-lettering {n} unusable messages, medians of {repeat} round(s) (2 cores)")
    print(
        "CPU in us per message; 'beyond' is the broker's CPU beyond delivering the messages "
        "(ack's), per message dead-lettered"
    )
    print(f"{'route':10} {'msg/s':>8} {'broker':>8} {'consumer':>9} {'beyond':>8}")
    for route in results:
        share = results[route][0]["dead_share"]
        beyond = "-" if route == "ack" else f"{(median(route, 'broker_us') - base) / share:.1f}"
        print(
            f"{route:10} {median(route, 'rate'):8.0f} {median(route, 'broker_us'):8.1f} "
            f"{median(route, 'consumer_us'):9.1f} {beyond:>8}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
