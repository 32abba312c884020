"""Replies onto the `ai.responses` topic exchange, confirmed by the broker.

The consumer acks an event only after `publish()` returns, and `publish()`
returns only after the broker confirmed the reply (publisher confirms) and
routed it somewhere (`mandatory`): a reply that no queue would take raises
instead of vanishing.
"""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from observability.metrics import Metrics
from publishers.confirm import PublishFailed, Unroutable, publish_confirmed
from schemas import headers
from schemas.headers import ErrorType
from schemas.replies import Reply

log = logging.getLogger(__name__)


class ReplyPublisher:
    def __init__(self, exchange: AbstractExchange, metrics: Metrics | None = None) -> None:
        self._exchange = exchange
        self._metrics = metrics

    @classmethod
    async def open(
        cls, channel: AbstractChannel, exchange_name: str, metrics: Metrics | None = None
    ) -> ReplyPublisher:
        """Bind to the declared exchange (the topology declares it, we only look it up)."""
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        return cls(exchange, metrics)

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
        try:
            await publish_confirmed(self._exchange, message, reply.routing_key)
        except Unroutable as exc:
            # The first thing to tell a newcomer whose replies vanish: nobody listens.
            if self._metrics is not None:
                self._metrics.unroutable_replies.inc()
            log.warning(
                f"reply unroutable: no queue is bound to exchange {exc.exchange!r} for "
                f"routing key {exc.routing_key!r}; is the router running and bound?",
                extra={"action": "publish_reply", "exchange": exc.exchange,
                       "routing_key": exc.routing_key, "error_type": ErrorType.UNROUTABLE})
            raise


__all__ = ["PublishFailed", "ReplyPublisher", "Unroutable"]
