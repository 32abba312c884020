"""One confirmed, mandatory publish, with the broker's refusals turned into one error type.

A publish that meets a lost connection waits for aio-pika's robust channel to
come back and is tried once more: a broker restart or a dropped connection
then costs a reply some seconds, not a trip through the retry queues (whose
publishes would meet the same dead channel).
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractExchange, AbstractMessage, AbstractRobustChannel
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError

from schemas.errors import WaddleError

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 30.0
# How long a publish waits for a lost connection to be restored before it gives up.
RECONNECT_WAIT_S = 30.0
# The channel can still look open for a moment after its connection died (the
# close callbacks run later); poll for the restored channel at this pace.
READY_POLL_S = 0.1


class PublishFailed(WaddleError):
    """The broker did not take the message: nacked, unroutable, or the connection is down."""


class Unroutable(PublishFailed):
    """The broker returned the message (basic.return): no queue is bound for its routing key.

    For a reply this means nothing consumes `ai.responses` for that platform and
    community: the router is not running, or not bound (yet). It is its own
    type so the pipeline can say so, count it and dead-letter it as `unroutable`.
    """

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(f"{exchange} / {routing_key}: unroutable (no queue is bound for it)")
        self.exchange = exchange
        self.routing_key = routing_key


async def publish_confirmed(
    exchange: AbstractExchange,
    message: AbstractMessage,
    routing_key: str,
    *,
    timeout_s: float = PUBLISH_TIMEOUT_S,
    reconnect_wait_s: float = RECONNECT_WAIT_S,
) -> None:
    """Publish and return only once the broker confirmed it.

    The channel must have publisher confirms on and `on_return_raises=True`:
    then a nack raises `DeliveryError`, an unroutable message `PublishError`,
    and a lost connection an AMQP or connection error — all `PublishFailed`
    here, so the caller has one thing to handle.

    On a robust channel, a publish that failed because the channel or its
    connection was lost waits up to `reconnect_wait_s` for the channel to be
    restored and is sent once more. The broker may have taken the first copy
    and only its confirm was lost, so the message can arrive twice: that is
    why every message we publish carries a stable `message_id` (a reply is
    `reply:<event_id>`), by which the receiver can drop the second copy.
    """
    where = f"{exchange.name or '(default exchange)'} / {routing_key}"
    try:
        await _publish(exchange, message, routing_key, timeout_s)
        return
    except _ConnectionLost as lost:
        channel = getattr(exchange, "channel", None)
        if not isinstance(channel, AbstractRobustChannel):
            raise PublishFailed(f"{where}: {lost.cause!r}") from lost.cause
        first_error = lost.cause
    log.warning("publish hit a lost broker connection; waiting for it to come back",
                extra={"action": "publish_reconnect", "target": where,
                       "error": repr(first_error)})
    try:
        await _wait_until_restored(channel, reconnect_wait_s)
    except TimeoutError as exc:
        raise PublishFailed(
            f"{where}: connection not restored within {reconnect_wait_s:g} s "
            f"after {first_error!r}") from exc
    try:
        await _publish(exchange, message, routing_key, timeout_s)
    except _ConnectionLost as lost:
        raise PublishFailed(f"{where}: {lost.cause!r} (after a reconnect)") from lost.cause


class _ConnectionLost(WaddleError):
    """Internal: the publish failed because the channel or connection went away."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


async def _publish(
    exchange: AbstractExchange, message: AbstractMessage, routing_key: str, timeout_s: float,
) -> None:
    where = f"{exchange.name or '(default exchange)'} / {routing_key}"
    try:
        # Our own deadline, not publish(timeout=...): aiormq implements that with
        # asyncio.wait_for, one extra task for every reply (bench/RESULTS.md).
        async with asyncio.timeout(timeout_s):
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
    except PublishError as exc:
        raise Unroutable(exchange.name or "(default exchange)", routing_key) from exc
    except DeliveryError as exc:
        # A nack is the broker's answer, not a lost connection: do not wait and resend.
        raise PublishFailed(f"{where}: {exc!r}") from exc
    except TimeoutError as exc:
        # No confirm within `timeout_s` on a live connection: waiting more will not help.
        raise PublishFailed(f"{where}: {exc!r}") from exc
    except (ChannelInvalidStateError, AMQPError, ConnectionError) as exc:
        # A closed or reconnecting channel raises ChannelInvalidStateError (a
        # RuntimeError); an in-flight publish gets the connection's or channel's
        # close reason.
        raise _ConnectionLost(exc) from exc


async def _wait_until_restored(channel: AbstractRobustChannel, wait_s: float) -> None:
    """Until the robust channel is open again (raises TimeoutError after `wait_s`)."""
    async with asyncio.timeout(wait_s):
        while True:
            await channel.ready()
            if not channel.is_closed:
                return
            await asyncio.sleep(READY_POLL_S)
