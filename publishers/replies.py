"""Replies onto the `ai.responses` topic exchange, confirmed by the broker.

The consumer acks an event only after `publish()` returns, and `publish()`
returns only after the broker confirmed the reply (publisher confirms) and
routed it somewhere (`mandatory`): a reply that no queue would take raises
instead of vanishing.
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from publishers.confirm import PublishFailed, publish_confirmed
from schemas import headers
from schemas.replies import Reply


class ReplyPublisher:
    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange

    @classmethod
    async def open(cls, channel: AbstractChannel, exchange_name: str) -> ReplyPublisher:
        """Bind to the declared exchange (the topology declares it, we only look it up)."""
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        return cls(exchange)

    async def publish(self, reply: Reply, *, traceparent: str | None = None) -> None:
        message = aio_pika.Message(
            body=reply.to_json(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=reply.event_id,
            message_id=f"reply:{reply.event_id}",
            timestamp=reply.created_at,
            headers={headers.TRACEPARENT: traceparent} if traceparent else {},
        )
        await publish_confirmed(self._exchange, message, reply.routing_key)


__all__ = ["PublishFailed", "ReplyPublisher"]
