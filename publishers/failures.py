"""Retry copies and dead letters: the original body, unchanged, with the failure in headers.

Both are confirmed publishes; the consumer acks the original only after one of
them is confirmed, so a failure never loses the event. A retry copy goes to
the delay queue of its step (`ai.interaction.retry.<ms>`), whose TTL sends it
back to `ai.interaction`: no handler sleeps while holding a prefetch slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from broker.topology import Topology
from publishers.confirm import publish_confirmed
from schemas import headers

MAX_ERROR_CHARS = 1000


@dataclass(frozen=True, slots=True)
class Failure:
    error_type: headers.ErrorType
    error: str


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def retry_count(message_headers: Mapping[str, Any] | None) -> int:
    """How many times this event was retried already (0 for a first delivery)."""
    value = (message_headers or {}).get(headers.RETRY_COUNT, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def failure_headers(
    original: Mapping[str, Any] | None,
    failure: Failure,
    *,
    original_queue: str,
    count_retry: bool,
) -> dict[str, Any]:
    """The headers of a retry copy or dead letter, carried over from the last attempt."""
    carried = {k: v for k, v in (original or {}).items() if not k.startswith("x-death")}
    for key in ("x-delivery-count", "x-first-death-exchange", "x-first-death-queue",
                "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                "x-last-death-reason"):
        carried.pop(key, None)
    stamp = now_rfc3339()
    count = retry_count(original)
    carried.update({
        headers.ERROR: failure.error[:MAX_ERROR_CHARS],
        headers.ERROR_TYPE: failure.error_type,
        headers.RETRY_COUNT: count + 1 if count_retry else count,
        headers.FIRST_FAILED_AT: carried.get(headers.FIRST_FAILED_AT) or stamp,
        headers.LAST_FAILED_AT: stamp,
        headers.ORIGINAL_QUEUE: original_queue,
    })
    return carried


def copy_message(message: AbstractIncomingMessage, new_headers: dict[str, Any]) -> aio_pika.Message:
    """The same body and properties as `message`, with new headers, persistent."""
    return aio_pika.Message(
        body=message.body,
        headers=new_headers,
        content_type=message.content_type or "application/json",
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=None,  # the broker checks user_id against the publishing user
        app_id=message.app_id,
    )


class FailurePublisher:
    def __init__(
        self, default_exchange: AbstractExchange, dead_letter_exchange: AbstractExchange,
        topology: Topology,
    ) -> None:
        self._default = default_exchange
        self._dlx = dead_letter_exchange
        self._topology = topology

    @classmethod
    async def open(cls, channel: AbstractChannel, topology: Topology) -> FailurePublisher:
        dlx = await channel.get_exchange(topology.dead_letter_exchange, ensure=False)
        return cls(channel.default_exchange, dlx, topology)

    async def retry(
        self, message: AbstractIncomingMessage, failure: Failure, delay_ms: int,
        *, extra_headers: Mapping[str, Any] | None = None, count_retry: bool = True,
    ) -> None:
        """Send a copy to the delay queue of `delay_ms`; it comes back after the delay."""
        new_headers = failure_headers(
            message.headers, failure, original_queue=self._topology.interaction_queue,
            count_retry=count_retry,
        )
        new_headers.update(extra_headers or {})
        await publish_confirmed(
            self._default, copy_message(message, new_headers), self._topology.retry_queue(delay_ms)
        )

    async def dead_letter(
        self, message: AbstractIncomingMessage, failure: Failure,
        *, extra_headers: Mapping[str, Any] | None = None,
    ) -> None:
        new_headers = failure_headers(
            message.headers, failure, original_queue=self._topology.interaction_queue,
            count_retry=False,
        )
        new_headers.update(extra_headers or {})
        await publish_confirmed(
            self._dlx, copy_message(message, new_headers), self._topology.interaction_queue
        )
