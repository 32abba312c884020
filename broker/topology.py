"""The queues and exchanges of the contract, named from one prefix and declared idempotently.

Every name derives from `QUEUE_PREFIX`, so two deployments can share a broker.
Declaring is idempotent: the worker does it at start and `waddle-ai topology`
does it on demand. A queue that already exists with other arguments makes the
broker refuse the declaration; we turn that into an error that says which
queue and what to do, instead of a bare PRECONDITION_FAILED.

Queue types (RabbitMQ 3.10+ and 4.x):
- `ai.interaction` is a quorum queue with a delivery limit and at-least-once
  dead-lettering to `ai.dlx`: a message that kills its consumer again and again
  ends in the DLQ instead of looping, and is not lost on the way.
- the retry queues are quorum queues with a message TTL whose expired messages
  dead-letter (at-least-once) back to `ai.interaction` through the default
  exchange. One queue per delay keeps expiry in order: every message in a
  queue has the same TTL, so the head always expires first.
- `ai.dlx` is a direct exchange; the DLQ is bound with the name of the queue
  its letters come from, so other queues can later get DLQs on the same DLX.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType
from aiormq.exceptions import ChannelPreconditionFailed

from schemas.errors import WaddleError


class TopologyError(WaddleError, RuntimeError):
    """The broker holds a queue or exchange of ours declared differently."""


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str = "ai"
    retry_delays_ms: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000)
    delivery_limit: int = 10

    @property
    def interaction_queue(self) -> str:
        return f"{self.prefix}.interaction"

    @property
    def responses_exchange(self) -> str:
        return f"{self.prefix}.responses"

    @property
    def completions_queue(self) -> str:
        return f"{self.prefix}.completions"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.interaction.dlq"

    def retry_queue(self, delay_ms: int) -> str:
        return f"{self.prefix}.interaction.retry.{delay_ms}"

    @property
    def retry_queues(self) -> list[str]:
        return [self.retry_queue(delay) for delay in self.retry_delays_ms]

    def interaction_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.interaction_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def retry_arguments(self, delay_ms: int) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.interaction_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def describe(self) -> list[dict[str, Any]]:
        """What `declare()` creates, for `waddle-ai topology` to print."""
        rows: list[dict[str, Any]] = [
            {"name": self.interaction_queue, "kind": "quorum queue",
             "arguments": self.interaction_arguments()},
            {"name": self.responses_exchange, "kind": "topic exchange", "arguments": {}},
            {"name": self.completions_queue, "kind": "queue", "arguments": {}},
        ]
        rows += [
            {"name": self.retry_queue(delay), "kind": "quorum queue",
             "arguments": self.retry_arguments(delay)}
            for delay in self.retry_delays_ms
        ]
        rows += [
            {"name": self.dead_letter_exchange, "kind": "direct exchange", "arguments": {}},
            {"name": self.dead_letter_queue, "kind": "quorum queue",
             "arguments": {"x-queue-type": "quorum"},
             "bound": f"{self.dead_letter_exchange} / {self.interaction_queue}"},
        ]
        return rows

    @staticmethod
    def dead_letter_arguments(broker_major: int) -> dict[str, Any]:
        """RabbitMQ 4.0-4.2 give every quorum queue a delivery limit of 20 and count
        each look `waddle-ai dlq list` takes; the DLQ has nowhere to dead-letter to,
        so its letters would vanish. On 4.x it gets no limit (-1, which 3.x would
        read differently, so 3.x gets none at all)."""
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if broker_major >= 4:
            arguments["x-delivery-limit"] = -1
        return arguments

    async def declare(self, channel: AbstractChannel) -> None:
        """Create everything, or check it is already there as we would create it."""
        await _exchange(channel, self.dead_letter_exchange, ExchangeType.DIRECT)
        dlq = await _queue(channel, self.dead_letter_queue,
                           self.dead_letter_arguments(await broker_major_version(channel)))
        await dlq.bind(self.dead_letter_exchange, routing_key=self.interaction_queue)
        await _exchange(channel, self.responses_exchange, ExchangeType.TOPIC)
        await _queue(channel, self.interaction_queue, self.interaction_arguments())
        for delay in self.retry_delays_ms:
            await _queue(channel, self.retry_queue(delay), self.retry_arguments(delay))
        await _queue(channel, self.completions_queue, {})

    async def delete(self, channel: AbstractChannel) -> None:
        """Remove every queue and exchange `declare` creates, messages included.

        For tools that declared a throw-away prefix of their own (the
        benchmark, the evaluation suite, the image check), never for a live one.
        """
        for name in (self.interaction_queue, self.dead_letter_queue, self.completions_queue,
                     *self.retry_queues):
            await channel.queue_delete(name)
        for name in (self.responses_exchange, self.dead_letter_exchange):
            await channel.exchange_delete(name)


async def broker_major_version(channel: AbstractChannel) -> int:
    """The broker's major version from its connection handshake (0 when unknown)."""
    underlay = await channel.get_underlay_channel()
    version = underlay.connection.server_properties.get("version", b"0")
    text = version.decode() if isinstance(version, bytes) else str(version)
    try:
        return int(text.split(".", 1)[0])
    except ValueError:
        return 0


async def _exchange(channel: AbstractChannel, name: str, kind: ExchangeType) -> None:
    try:
        await channel.declare_exchange(name, kind, durable=True)
    except ChannelPreconditionFailed as exc:
        raise TopologyError(
            f"exchange {name!r} exists with another type or flags ({exc}); "
            f"it must be a durable {kind.value} exchange"
        ) from exc


async def _queue(
    channel: AbstractChannel, name: str, arguments: Mapping[str, Any]
) -> aio_pika.abc.AbstractQueue:
    try:
        return await channel.declare_queue(name, durable=True, arguments=dict(arguments))
    except ChannelPreconditionFailed as exc:
        raise TopologyError(
            f"queue {name!r} exists with other arguments ({exc}); expected "
            f"{dict(arguments)}. Move its messages and delete it, or change the "
            "settings back (RabbitMQ cannot change a queue's arguments in place)"
        ) from exc
