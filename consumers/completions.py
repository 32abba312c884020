"""The completions RPC: OpenAI requests on `<prefix>.completions`, answers to `reply_to`.

The requester waits on its own reply queue with a correlation id, so each
request gets exactly one answer there: the `chat.completion` object, or the
same `{"error": ...}` body the HTTP API would send (its HTTP status is in the
`x-status` header). Streaming has no meaning over one reply message and is
refused.

A request is acked only once its reply is confirmed by the broker. Two cases
ack without a reply, because nothing could ever be delivered: a request
without `reply_to`, and a reply the broker returns as unroutable (the
requester's queue is gone, it gave up). A reply the broker fails to confirm
for another reason is retried once through a requeue, since the completion
is worth keeping; a second failure drops it, because a requester still
waiting by then is the exception.

RabbitMQ's direct reply-to (`reply_to=amq.rabbitmq.reply-to`) works too. Two
quirks of the 3.x brokers shape its handling: a mandatory publish to it is
returned as unroutable although it was delivered, and a reply-to name the
broker cannot decode makes it close the publishing *connection*. So a
returned direct reply counts as sent, a failed one is never requeued, and the
replies should go out on a connection of their own (see `App` wiring).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import PublishError

from consumers.completion_service import (
    CompletionError,
    CompletionMetrics,
    CompletionService,
    completion_metrics,
    internal_error,
    invalid_request,
    parse_request,
)
from observability.metrics import Metrics
from publishers.confirm import PublishFailed, publish_confirmed

log = logging.getLogger(__name__)

TRANSPORT = "rpc"
STATUS_HEADER = "x-status"
DEFAULT_MAX_CONCURRENT = 16
REQUEUE_PAUSE_S = 1.0
# RabbitMQ's pseudo-queue for RPC without a reply queue; replies go to `<this>.<key>`.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class CompletionsRpcConsumer:
    def __init__(
        self,
        *,
        queue_name: str,
        service: CompletionService,
        publish_channel: AbstractChannel,
        metrics: Metrics | None = None,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    ) -> None:
        """`publish_channel` must have publisher confirms and `on_return_raises=True`.

        Replies go through its default exchange, the one that routes to a
        `reply_to` queue by name.
        """
        self._queue_name = queue_name
        self._service = service
        self._exchange = publish_channel.default_exchange
        self._metrics: CompletionMetrics | None = (
            completion_metrics(metrics) if metrics is not None else None)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def attached(self) -> bool:
        return (
            self._consumer_tag is not None
            and self._queue is not None
            and not self._queue.channel.is_closed
        )

    async def attach(self, channel: AbstractChannel) -> None:
        """Consume on `channel` (give it its own QoS; the semaphore bounds the work)."""
        # The same arguments as the topology's declaration, so this is a no-op check,
        # and a robust channel re-declares and re-consumes after a reconnect.
        self._queue = await channel.declare_queue(self._queue_name, durable=True)
        self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)
        log.info("completions RPC consumer attached",
                 extra={"action": "attach", "queue": self._queue_name})

    async def stop(self, grace_s: float = 10.0) -> bool:
        """Stop taking requests and wait for those in hand; True if all of them finished.

        Requests still running after `grace_s` are cancelled unacked, so the
        broker hands them to another replica.
        """
        self._stopping = True
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception:
                log.warning("could not cancel the RPC subscription", exc_info=True)
        self._consumer_tag = None
        pending = [task for task in self._tasks if not task.done()]
        if not pending:
            return True
        _, still_running = await asyncio.wait(pending, timeout=grace_s)
        for task in still_running:
            task.cancel()
        await asyncio.gather(*still_running, return_exceptions=True)
        return not still_running

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            async with self._slots:
                if self._stopping:
                    await _settle(message.nack(requeue=True))
                    return
                started = time.perf_counter()
                outcome = await self._handle(message)
                if self._metrics is not None:
                    self._metrics.observe(TRANSPORT, outcome, time.perf_counter() - started)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> str:
        if not message.reply_to:
            log.warning("completion request without reply_to; dropped", extra={
                "action": "completion_rpc", "message_id": message.message_id,
                "correlation_id": message.correlation_id})
            await _settle(message.ack())
            return "no_reply_to"
        status, body, outcome = await self._answer(message.body)
        reply = aio_pika.Message(
            body=orjson.dumps(body),
            content_type="application/json",
            correlation_id=message.correlation_id,
            message_id=f"completion:{message.message_id or message.correlation_id or ''}",
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            headers={STATUS_HEADER: status},
        )
        try:
            await publish_confirmed(self._exchange, reply, message.reply_to)
        except PublishFailed as exc:
            return await self._reply_failed(message, message.reply_to, exc, outcome)
        await _settle(message.ack())
        return outcome

    async def _reply_failed(
        self, message: AbstractIncomingMessage, reply_to: str, exc: PublishFailed, outcome: str
    ) -> str:
        direct = reply_to.startswith(DIRECT_REPLY_TO)
        context = {"action": "completion_rpc", "reply_to": reply_to,
                   "correlation_id": message.correlation_id}
        if isinstance(exc.__cause__, PublishError):
            if direct:
                # RabbitMQ before 4.x returns every mandatory publish to a direct
                # reply-to as NO_ROUTE, and delivers it all the same.
                log.debug("direct reply-to reply returned as unroutable", extra=context)
                await _settle(message.ack())
                return outcome
            log.warning("the requester's reply queue is gone; reply dropped", extra=context)
            await _settle(message.ack())
            return "reply_unroutable"
        if direct or message.redelivered:
            # A direct reply-to dies with its requester's channel, so a second try
            # cannot reach anyone; and a name the broker cannot parse makes it
            # close our connection, which must not happen again and again.
            log.error("could not publish a completion reply; dropped", exc_info=True,
                      extra=context)
            await _settle(message.ack())
            return "reply_failed"
        log.error("could not publish a completion reply; requeueing the request",
                  exc_info=True, extra=context)
        await asyncio.sleep(REQUEUE_PAUSE_S)
        await _settle(message.nack(requeue=True))
        return "reply_requeued"

    async def _answer(self, raw: bytes) -> tuple[int, dict[str, Any], str]:
        """(HTTP-equivalent status, reply body, metric outcome) for one request body."""
        try:
            request = parse_request(raw)
            if request.streamed:
                raise invalid_request("stream=true is not supported over RPC: one request "
                                      "gets one reply; use the HTTP API to stream",
                                      code="stream_not_supported", param="stream")
            return 200, await self._service.complete(request), "ok"
        except CompletionError as exc:
            return exc.status, exc.body(), exc.code
        except Exception:
            log.exception("completion RPC request crashed", extra={"action": "completion_rpc"})
            error = internal_error()
            return error.status, error.body(), error.code


async def _settle(settling: Any) -> None:
    """Ack/nack on a channel that died fails; the broker redelivers the request anyway."""
    try:
        await settling
    except Exception as exc:
        log.warning("could not settle a completion request", extra={
            "action": "settle", "error": repr(exc)})
