"""One confirmed, mandatory publish, with the broker's refusals turned into one error type."""

from __future__ import annotations

from aio_pika.abc import AbstractExchange, AbstractMessage
from aio_pika.exceptions import AMQPError, PublishError

PUBLISH_TIMEOUT_S = 30.0


class PublishFailed(Exception):
    """The broker did not take the message: nacked, unroutable, or the connection is down."""


async def publish_confirmed(
    exchange: AbstractExchange,
    message: AbstractMessage,
    routing_key: str,
    *,
    timeout_s: float = PUBLISH_TIMEOUT_S,
) -> None:
    """Publish and return only once the broker confirmed it.

    The channel must have publisher confirms on and `on_return_raises=True`:
    then a nack raises `DeliveryError`, an unroutable message `PublishError`,
    and a lost connection an AMQP or connection error — all `PublishFailed`
    here, so the caller has one thing to handle.
    """
    where = f"{exchange.name or '(default exchange)'} / {routing_key}"
    try:
        await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=timeout_s)
    except PublishError as exc:
        raise PublishFailed(f"{where}: unroutable (no queue is bound for it)") from exc
    except (TimeoutError, AMQPError, ConnectionError) as exc:
        raise PublishFailed(f"{where}: {exc!r}") from exc
