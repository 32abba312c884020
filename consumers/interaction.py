"""Consume `ai.interaction`: bounded concurrency, and every delivery settled safely.

Settling is the consumer's whole job beyond calling the pipeline:

| outcome                      | broker actions, in this order                    |
|------------------------------|--------------------------------------------------|
| reply published (confirmed)  | ack                                              |
| no reply needed              | ack (counted by reason)                          |
| retryable failure            | confirmed copy to the next delay queue, then ack |
| deferred (copy in flight     | confirmed copy to a delay queue, retry count     |
|   elsewhere, circuits open)  |   unchanged (not a failure), then ack            |
| out of retries / permanent   | confirmed dead letter, then ack                  |
| copy or dead letter refused  | nack with requeue (the delivery limit bounds it) |

Whatever the outcome, once settled it passes through one more step, the
`OutcomeRecorder`: the event's fate, in words, kept for `waddle-ai explain`.

Concurrency is bounded twice: the broker's prefetch caps what this replica
holds, the semaphore caps what it works on. A stopping consumer cancels its
subscription first, lets what is in hand finish within the grace time, and
hands back what it had not started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelInvalidStateError

from consumers.outcomes import (
    DEAD_LETTERED,
    DEFERRED,
    NO_REPLY,
    REPLIED,
    REQUEUED,
    RETRYING,
    Fate,
    OutcomeRecorder,
    reason_text,
)
from consumers.pipeline import (
    Deferred,
    Delivery,
    Failed,
    InteractionPipeline,
    Outcome,
    Replied,
    Skipped,
)
from observability.logs import bind
from observability.metrics import Metrics
from publishers.confirm import PublishFailed
from publishers.failures import Failure, FailurePublisher, retry_count
from schemas import headers
from schemas.events import EventError, parse_event
from schemas.headers import ErrorType

log = logging.getLogger(__name__)

REQUEUE_PAUSE_S = 1.0


def choose_delay(delays_ms: Sequence[int], attempt: int, retry_after_s: float | None) -> int:
    """The delay step for retry number `attempt` (0-based), honouring a Retry-After.

    A provider's Retry-After moves the retry to the first step at least that
    long (or the longest step), so we do not knock again before we may.
    """
    delay = delays_ms[min(attempt, len(delays_ms) - 1)]
    if retry_after_s is not None:
        wanted = int(retry_after_s * 1000)
        longer = [d for d in delays_ms if d >= max(wanted, delay)]
        delay = min(longer) if longer else max(delays_ms)
    return delay


def defer_delay(delays_ms: Sequence[int], after_ms: int | None) -> int:
    """The longest delay step that ends before another attempt's lease does.

    So a copy waiting on a dead worker's lease comes back a few times, not
    once a second (45 round trips at the defaults), and still no later than
    the shortest step after the lease expires: waiting past it could make the
    event stale.
    """
    if after_ms is None:
        return min(delays_ms)
    fitting = [d for d in delays_ms if d <= after_ms]
    return max(fitting) if fitting else min(delays_ms)


def nearest_delay(delays_ms: Sequence[int], after_ms: int | None) -> int:
    """The delay step nearest `after_ms` (the longer on a tie).

    For an event waiting on an open circuit: it should come back just as the
    next health probe may have closed it. Much sooner, it is only refused
    again; much later, it stays silent after the provider is back.
    """
    if after_ms is None:
        return min(delays_ms)
    return min(delays_ms, key=lambda delay: (abs(delay - after_ms), -delay))


class InteractionConsumer:
    def __init__(
        self,
        *,
        queue_name: str,
        queue_arguments: dict[str, Any],
        pipeline: InteractionPipeline,
        failures: FailurePublisher,
        metrics: Metrics,
        max_concurrent: int,
        retry_delays_ms: Sequence[int],
        crash_marker: bytes | None = None,
        outcomes: OutcomeRecorder | None = None,
    ) -> None:
        self._queue_name = queue_name
        self._queue_arguments = queue_arguments
        self._pipeline = pipeline
        self._failures = failures
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max_concurrent)
        self._delays = tuple(retry_delays_ms)
        self._crash_marker = crash_marker
        self._outcomes = outcomes
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._stopping = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        metrics.capacity.set(max_concurrent)

    @property
    def attached(self) -> bool:
        """True while subscribed on an open channel (what /readyz reports)."""
        return (
            self._consumer_tag is not None
            and self._queue is not None
            and not self._queue.channel.is_closed
        )

    async def attach(self, channel: AbstractChannel) -> None:
        # Declared through the (robust) channel so a reconnect re-declares and re-consumes.
        self._queue = await channel.declare_queue(
            self._queue_name, durable=True, arguments=self._queue_arguments
        )
        self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)
        self._metrics.consumer_up.set(1)
        log.info("consumer attached", extra={"action": "attach", "queue": self._queue_name})

    async def stop(self, grace_s: float) -> bool:
        """Stop taking work and wait for what is in hand; True if all of it finished."""
        self._stopping = True
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception:
                log.warning("could not cancel the subscription", exc_info=True)
        self._consumer_tag = None
        self._metrics.consumer_up.set(0)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            return True
        except TimeoutError:
            log.warning("grace time over; in-flight events go back to the queue",
                        extra={"action": "stop", "in_flight": self._active})
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            return False

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aiormq runs this callback in a task of the delivery's channel and
        # cancels it when the channel closes (a lost connection). Handling that
        # already asked the provider or published the reply must still finish
        # and record its marker, or the redelivered copy is answered again: it
        # runs in a task of our own, which only stop() cancels. Its ack is then
        # skipped (the channel is gone) and the redelivery finds the marker.
        task = asyncio.get_running_loop().create_task(self._handle_in_slot(message))
        self._tasks.add(task)
        self._active += 1
        self._idle.clear()
        task.add_done_callback(self._on_handled)
        await asyncio.shield(task)

    def _on_handled(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def _handle_in_slot(self, message: AbstractIncomingMessage) -> None:
        async with self._slots:
            if self._stopping:
                # Not started: hand it back for another replica, untouched.
                await self._settle_safely(message.nack(requeue=True))
                return
            if _channel_gone(message):
                # Waited for a slot while its channel died: the broker already
                # took it back and redelivers it; working on it now is waste.
                return
            self._metrics.in_flight.inc()
            started = time.perf_counter()
            try:
                event_id, community_id, fate = await self._handle(message)
            finally:
                self._metrics.in_flight.dec()
            self._metrics.handling.labels(fate.label).observe(time.perf_counter() - started)
            if self._outcomes is not None and event_id:
                # After the settlement: recording never delays or risks the ack.
                await self._outcomes.record(event_id, fate, community_id=community_id)

    async def _handle(
        self, message: AbstractIncomingMessage
    ) -> tuple[str | None, str | None, Fate]:
        """Parse, run the pipeline, settle: (event id, community, how it was settled)."""
        if self._crash_marker and self._crash_marker in message.body:
            # Test-only (WADDLE_TEST_CRASH_MARKER): die as a segfault or OOM kill would,
            # with the delivery unacked, to prove the delivery limit ends the loop.
            log.critical("crash marker received; exiting", extra={"action": "crash_hook"})
            os._exit(70)
        try:
            event = parse_event(message.body)
        except EventError as exc:
            self._metrics.events_received.labels("invalid").inc()
            log.warning("invalid event", extra={
                "action": "parse", "error_type": exc.error_type, "error": str(exc),
                "message_id": message.message_id})
            fate = await self._dead_letter(message, Failure(exc.error_type, str(exc)),
                                           explain=f"{exc.error_type}: the body is not a "
                                                   "valid event (see `waddle-ai dlq list`)")
            return message.message_id, None, fate

        self._metrics.events_received.labels(event.message_type.value).inc()
        message_headers = message.headers or {}
        delivery = Delivery(
            attempt_id=uuid.uuid4().hex,
            first_received_at=_first_received_at(message_headers),
            traceparent=_text(message_headers.get(headers.TRACEPARENT)),
            replayed=headers.REPLAYED_AT in message_headers,
        )
        with bind(event_id=event.event_id, community=event.community_id, user=event.user_id,
                  platform=event.platform.value, traceparent=delivery.traceparent):
            started = time.perf_counter()
            try:
                outcome = await self._pipeline.handle(event, delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("event handling crashed", extra={"action": "handle"})
                outcome = Failed(
                    Failure(ErrorType.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"),
                    retryable=True)
            extra: dict[str, Any] = {
                "action": "handle", "result": _describe(outcome),
                "execution_time": round((time.perf_counter() - started) * 1000, 1)}
            if isinstance(outcome, Failed):
                extra["error"] = outcome.failure.error
            elif isinstance(outcome, Deferred) and outcome.detail:
                extra["error"] = outcome.detail
            log.info("event handled", extra=extra)
            fate = await self._settle(message, delivery, outcome)
            return event.event_id, event.community_id, fate

    async def _settle(
        self, message: AbstractIncomingMessage, delivery: Delivery, outcome: Outcome
    ) -> Fate:
        if isinstance(outcome, Replied):
            reply = outcome.reply
            self._metrics.replies.labels(reply.trigger.value, reply.provider).inc()
            await self._ack(message)
            waited = f", {reply.age_ms} ms after it was sent" if reply.age_ms is not None else ""
            return Fate(REPLIED, reply.trigger.value,
                        f"answered by {reply.provider} ({reply.model}) in "
                        f"{reply.processing_time_ms} ms{waited}",
                        {"trigger": reply.trigger.value, "provider": reply.provider,
                         "age_ms": reply.age_ms})
        if isinstance(outcome, Skipped):
            self._metrics.no_reply.labels(outcome.reason).inc()
            await self._ack(message)
            return Fate(NO_REPLY, outcome.reason, outcome.detail or reason_text(outcome.reason))
        carried = {headers.FIRST_RECEIVED_AT: delivery.first_received_at.isoformat()}
        if isinstance(outcome, Deferred):
            if outcome.reason is ErrorType.CIRCUIT_OPEN:
                failure = Failure(outcome.reason, outcome.detail or "every circuit is open")
                delay = nearest_delay(self._delays, outcome.after_ms)
            else:
                failure = Failure(outcome.reason, outcome.detail
                                  or "another copy of this event is being answered")
                delay = defer_delay(self._delays, outcome.after_ms)
            return await self._retry(message, failure, delay, carried, count=False)
        if not outcome.retryable:
            return await self._dead_letter(message, outcome.failure, carried)
        attempt = retry_count(message.headers)
        if attempt >= len(self._delays):
            failure = Failure(outcome.failure.error_type,
                              f"gave up after {attempt} retries: {outcome.failure.error}")
            return await self._dead_letter(message, failure, carried)
        delay = choose_delay(self._delays, attempt, outcome.retry_after_s)
        return await self._retry(message, outcome.failure, delay, carried, count=True)

    async def _retry(
        self, message: AbstractIncomingMessage, failure: Failure, delay_ms: int,
        carried: dict[str, Any], *, count: bool,
    ) -> Fate:
        try:
            await self._failures.retry(message, failure, delay_ms, extra_headers=carried,
                                       count_retry=count)
        except PublishFailed:
            return await self._requeue(message, "retry copy")
        self._metrics.retries.labels(str(delay_ms), failure.error_type).inc()
        await self._ack(message)
        if not count:
            return Fate(DEFERRED, failure.error_type,
                        f"{reason_text(failure.error_type)}; back in {delay_ms / 1000:g} s")
        attempt = retry_count(message.headers) + 1
        return Fate(RETRYING, failure.error_type,
                    f"{failure.error_type}: {failure.error}; retry {attempt} of "
                    f"{len(self._delays)} in {delay_ms / 1000:g} s (RETRY_DELAYS_MS)",
                    {"retry": attempt, "delay_ms": delay_ms})

    async def _dead_letter(
        self, message: AbstractIncomingMessage, failure: Failure,
        carried: dict[str, Any] | None = None, *, explain: str | None = None,
    ) -> Fate:
        try:
            await self._failures.dead_letter(message, failure, extra_headers=carried)
        except PublishFailed:
            return await self._requeue(message, "dead letter")
        self._metrics.dead_letters.labels(failure.error_type).inc()
        log.warning("event dead-lettered", extra={
            "action": "dead_letter", "error_type": failure.error_type, "error": failure.error,
            "message_id": message.message_id})
        await self._ack(message)
        return Fate(DEAD_LETTERED, failure.error_type,
                    explain or f"{failure.error_type}: {failure.error}; fix the cause, then "
                               f"`waddle-ai dlq replay {_replay_selector(message, failure)}`")

    async def _requeue(self, message: AbstractIncomingMessage, what: str) -> Fate:
        """The broker refused our copy: give the original back rather than lose it."""
        self._metrics.settle_failures.inc()
        log.error(f"could not publish the {what}; returning the event to the queue",
                  exc_info=True, extra={"action": "requeue", "message_id": message.message_id})
        await asyncio.sleep(REQUEUE_PAUSE_S)
        await self._settle_safely(message.nack(requeue=True))
        return Fate(REQUEUED, "settle_failed",
                    f"the broker refused the {what}; the event went back to the queue")

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        if _channel_gone(message):
            # Its channel died: the broker already took the delivery back and
            # will redeliver it; an ack now would fail or, worse, hit a new channel.
            log.info("delivery's channel is gone; it will be redelivered",
                     extra={"action": "settle", "message_id": message.message_id})
            return
        await self._settle_safely(message.ack())

    @staticmethod
    async def _settle_safely(settling: Any) -> None:
        """Ack/nack on a channel that died is pointless: the broker redelivers it."""
        try:
            await settling
        except Exception as exc:
            log.warning("could not settle a delivery; the broker will redeliver it",
                        extra={"action": "settle", "error": repr(exc)})


def _replay_selector(message: AbstractIncomingMessage, failure: Failure) -> str:
    return (f"--id {message.message_id}" if message.message_id
            else f"--error-type {failure.error_type}")


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    try:
        return bool(message.channel.is_closed)
    except ChannelInvalidStateError:
        return True


def _first_received_at(message_headers: dict[str, Any]) -> datetime:
    carried = _text(message_headers.get(headers.FIRST_RECEIVED_AT))
    if carried:
        try:
            parsed = datetime.fromisoformat(carried)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.now(UTC)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, Replied):
        return "replied"
    if isinstance(outcome, Skipped):
        return f"skipped:{outcome.reason}"
    if isinstance(outcome, Deferred):
        return f"deferred:{outcome.reason}"
    return f"failed:{outcome.failure.error_type}"
