"""Publish an event as the router does, and optionally wait for its reply.

Used by `waddle-ai publish` and by the end-to-end tests, so the tests drive
the worker through exactly the wire contract the router uses.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson

from broker.topology import Topology
from publishers.confirm import publish_confirmed


def make_event(
    text: str,
    *,
    community: str = "dev-community",
    platform: str = "twitch",
    channel: str = "dev-channel",
    user: str = "dev-user",
    display_name: str | None = None,
    message_type: str = "chatMessage",
    metadata: Mapping[str, Any] | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": event_id or uuid.uuid4().hex,
        "community_id": community,
        "platform": platform,
        "channel_id": channel,
        "user_id": user,
        "username": user,
        "display_name": display_name or user,
        "message_type": message_type,
        "message_content": text,
        "metadata": dict(metadata or {}),
        "sent_at": datetime.now(UTC).isoformat(),
    }


class RouterClient:
    """A connection that publishes events and collects replies like the router."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, topology: Topology):
        self._connection = connection
        self._topology = topology
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        self._reply_queue: aio_pika.abc.AbstractQueue | None = None

    @classmethod
    async def connect(cls, amqp_url: str, topology: Topology) -> RouterClient:
        connection = await aio_pika.connect_robust(
            amqp_url, client_properties={"connection_name": "waddle-ai router client"})
        client = cls(connection, topology)
        client._channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
        await topology.declare(client._channel)
        return client

    async def listen(self, binding_key: str = "#") -> None:
        """Bind a private queue to `ai.responses` before publishing, so no reply is missed."""
        assert self._channel is not None
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self._topology.responses_exchange, routing_key=binding_key)
        await queue.consume(self._on_reply, no_ack=True)
        self._reply_queue = queue

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await self._replies.put(message)

    async def publish(
        self, event: Mapping[str, Any] | bytes, *, headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        assert self._channel is not None
        body = event if isinstance(event, bytes) else orjson.dumps(event)
        if message_id is None and not isinstance(event, bytes):
            message_id = str(event.get("event_id"))
        message = aio_pika.Message(
            body=body, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id, headers=dict(headers or {}),
        )
        await publish_confirmed(
            self._channel.default_exchange, message, self._topology.interaction_queue)

    async def next_reply(self, timeout_s: float) -> aio_pika.abc.AbstractIncomingMessage:
        return await asyncio.wait_for(self._replies.get(), timeout=timeout_s)

    async def wait_for(self, event_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The reply to `event_id`, or None if none came in time (others are set aside)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                message = await self.next_reply(left)
            except TimeoutError:
                return None
            if message.correlation_id == event_id:
                reply: dict[str, Any] = orjson.loads(message.body)
                return reply
        return None

    async def aclose(self) -> None:
        await self._connection.close()
