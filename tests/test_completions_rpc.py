"""The completions RPC over the real broker, answered by real providers against a loopback fake.

The requester side is what any AMQP RPC client does: an exclusive reply
queue (or RabbitMQ's direct reply-to), a request on `<prefix>.completions`
with `reply_to` and `correlation_id`, and a wait for the answer. "Acked" is
proven the only way the broker shows it: after the consumer's channel is
closed, nothing comes back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from broker.topology import Topology
from config.settings import Settings
from consumers.completion_service import CompletionService
from consumers.completions import CompletionsRpcConsumer
from domain.provider_names import ProviderName
from observability.metrics import Metrics
from providers.ollama import OllamaProvider
from providers.router import ProviderRouter
from tests.conftest import AMQP_URL, queue_depth, running_worker
from tests.fake_provider import DEFAULT_REPLY, FakeProvider

HELLO = [{"role": "user", "content": "hello bot"}]
REPLY_TIMEOUT_S = 10.0


@dataclass
class Rpc:
    topology: Topology
    consumer: CompletionsRpcConsumer
    metrics: Metrics
    channel: AbstractChannel  # the requester's
    consume_channel: AbstractChannel
    replies: aio_pika.abc.AbstractQueue

    async def send(
        self, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> str:
        correlation_id = correlation_id or uuid.uuid4().hex
        await self.channel.default_exchange.publish(
            aio_pika.Message(body=body, content_type="application/json",
                             reply_to=reply_to, correlation_id=correlation_id),
            routing_key=self.topology.completions_queue)
        return correlation_id

    async def call(self, request: dict[str, Any] | bytes) -> AbstractIncomingMessage:
        body = request if isinstance(request, bytes) else orjson.dumps(request)
        correlation_id = await self.send(body, reply_to=self.replies.name)
        return await self.reply(correlation_id)

    async def reply(self, correlation_id: str) -> AbstractIncomingMessage:
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while True:
                message = await self.replies.get(fail=False, no_ack=True)
                if message is None:
                    await asyncio.sleep(0.02)
                    continue
                assert message.correlation_id == correlation_id
                return message

    def outcome(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "waddle_ai_completions_total", {"transport": "rpc", "outcome": outcome})
        return value or 0.0

    async def wait_for_outcome(self, outcome: str, count: float = 1) -> None:
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while True:
                if self.outcome(outcome) >= count:
                    return
                await asyncio.sleep(0.02)

    async def detach(self) -> None:
        """Stop and close the consumer's channel: whatever it had not acked goes back."""
        await self.consumer.stop(grace_s=5)
        await self.consume_channel.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as server:
        yield server


@pytest.fixture
async def connection(broker_cleanup: None) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        yield connection
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def rpc_worker(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider,
    *, max_concurrent: int = 16,
) -> AsyncIterator[Rpc]:
    topology = Topology(prefix=prefix)
    setup = await connection.channel()
    await topology.declare(setup)
    await setup.close()

    metrics = Metrics()
    provider = OllamaProvider(base_url=fake.url, model="llama3.2", timeout_s=5)
    router = ProviderRouter({ProviderName.OLLAMA: provider}, metrics)
    service = CompletionService(router, default_chain=[ProviderName.OLLAMA],
                                default_temperature=0.7, default_max_tokens=500, metrics=metrics)
    publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    consume_channel = await connection.channel()
    await consume_channel.set_qos(prefetch_count=32)
    consumer = CompletionsRpcConsumer(
        queue_name=topology.completions_queue, service=service,
        publish_channel=publish_channel, metrics=metrics, max_concurrent=max_concurrent)
    await consumer.attach(consume_channel)

    requester = await connection.channel()
    replies = await requester.declare_queue("", exclusive=True, auto_delete=True)
    try:
        yield Rpc(topology, consumer, metrics, requester, consume_channel, replies)
    finally:
        await consumer.stop(grace_s=5)
        for channel in (consume_channel, publish_channel, requester):
            if not channel.is_closed:
                await channel.close()
        await router.aclose()


async def test_request_gets_a_chat_completion(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider
) -> None:
    async with rpc_worker(prefix, connection, fake) as rpc:
        assert rpc.consumer.attached
        reply = await rpc.call({"model": "auto", "messages": HELLO, "temperature": 0.3,
                                "max_tokens": 50, "community_id": "penguin-club",
                                "user": "alice"})
        second = await rpc.call({"messages": HELLO})
        depth = await queue_depth(rpc.topology.completions_queue)

    body = orjson.loads(reply.body)
    assert reply.content_type == "application/json"
    assert (reply.headers or {}).get("x-status") == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "llama3.2"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": DEFAULT_REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert orjson.loads(second.body)["id"] != body["id"]
    assert fake.requests[0].json["options"] == {"temperature": 0.3, "num_predict": 50}
    assert depth == 0
    assert rpc.outcome("ok") == 2


@pytest.mark.parametrize(("request_body", "status", "code"), [
    (b'{"model": "auto"}', 400, "invalid_request"),
    (b"not json at all", 400, "invalid_json"),
    (orjson.dumps({"messages": HELLO, "stream": True}), 400, "stream_not_supported"),
    (orjson.dumps({"messages": HELLO * 101}), 400, "too_many_messages"),
    (orjson.dumps({"messages": [{"role": "user", "content": "x" * 300_000}]}), 413,
     "request_too_large"),
])
async def test_invalid_request_gets_an_error_object(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider,
    request_body: bytes, status: int, code: str,
) -> None:
    async with rpc_worker(prefix, connection, fake) as rpc:
        reply = await rpc.call(request_body)
    body = orjson.loads(reply.body)
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    assert (reply.headers or {}).get("x-status") == status
    assert fake.calls == 0


async def test_provider_failure_gets_an_error_object(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider
) -> None:
    fake.status = 429
    fake.retry_after = "3"
    async with rpc_worker(prefix, connection, fake) as rpc:
        limited = await rpc.call({"messages": HELLO})
        fake.status = 500
        fake.retry_after = None
        down = await rpc.call({"messages": HELLO})
        depth = await queue_depth(rpc.topology.completions_queue)
    assert orjson.loads(limited.body)["error"]["code"] == "rate_limit_exceeded"
    assert (limited.headers or {}).get("x-status") == 429
    assert orjson.loads(down.body)["error"] == {
        "message": "the AI provider 'ollama' is unavailable; try again later",
        "type": "server_error", "param": None, "code": "provider_unavailable"}
    assert depth == 0  # an error reply settles the request like an answer does


async def test_request_without_reply_to_is_acked_and_dropped(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider
) -> None:
    async with rpc_worker(prefix, connection, fake) as rpc:
        await rpc.send(orjson.dumps({"messages": HELLO}))
        await rpc.wait_for_outcome("no_reply_to")
        await rpc.detach()
        depth = await queue_depth(rpc.topology.completions_queue)
        stray = await rpc.replies.get(fail=False, no_ack=True)
    assert depth == 0
    assert stray is None
    assert fake.calls == 0  # nobody to answer: the provider is not asked


async def test_reply_to_a_vanished_queue_is_acked(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider
) -> None:
    async with rpc_worker(prefix, connection, fake) as rpc:
        await rpc.send(orjson.dumps({"messages": HELLO}),
                       reply_to=f"{prefix}.no-such-reply-queue")
        await rpc.wait_for_outcome("reply_unroutable")
        # The consumer still works afterwards (the return did not break its channel).
        reply = await rpc.call({"messages": HELLO})
        await rpc.detach()
        depth = await queue_depth(rpc.topology.completions_queue)
    assert orjson.loads(reply.body)["object"] == "chat.completion"
    assert depth == 0


async def test_direct_reply_to_works(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider
) -> None:
    async with rpc_worker(prefix, connection, fake) as rpc:
        direct = await rpc.channel.declare_queue("amq.rabbitmq.reply-to", passive=True)
        answered: asyncio.Future[AbstractIncomingMessage] = (
            asyncio.get_running_loop().create_future())

        async def on_reply(message: AbstractIncomingMessage) -> None:
            if not answered.done():
                answered.set_result(message)

        await direct.consume(on_reply, no_ack=True)
        correlation_id = await rpc.send(orjson.dumps({"messages": HELLO}),
                                        reply_to="amq.rabbitmq.reply-to")
        reply = await asyncio.wait_for(answered, REPLY_TIMEOUT_S)
        await rpc.wait_for_outcome("ok")
    assert reply.correlation_id == correlation_id
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == DEFAULT_REPLY


async def test_concurrency_is_bounded(
    prefix: str, connection: AbstractRobustConnection, fake: FakeProvider
) -> None:
    fake.latency_s = 0.2
    async with rpc_worker(prefix, connection, fake, max_concurrent=2) as rpc:
        sent = [await rpc.send(orjson.dumps({"messages": HELLO}), reply_to=rpc.replies.name)
                for _ in range(6)]
        received: set[str] = set()
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while len(received) < len(sent):
                message = await rpc.replies.get(fail=False, no_ack=True)
                if message is None:
                    await asyncio.sleep(0.02)
                    continue
                assert orjson.loads(message.body)["object"] == "chat.completion"
                received.add(str(message.correlation_id))
    assert received == set(sent)
    assert fake.max_in_flight == 2


async def test_the_worker_bounds_rpc_with_completions_max_concurrent(
    make_settings: Callable[..., Settings], prefix: str, connection: AbstractRobustConnection,
    fake: FakeProvider,
) -> None:
    """As wired by the app: COMPLETIONS_MAX_CONCURRENT is the RPC queue's bound too."""
    fake.latency_s = 0.2
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url,
                             completions_max_concurrent=3)
    async with running_worker(settings):
        requester = await connection.channel()
        replies = await requester.declare_queue("", exclusive=True, auto_delete=True)
        for _ in range(9):
            await requester.default_exchange.publish(
                aio_pika.Message(body=orjson.dumps({"messages": HELLO}),
                                 content_type="application/json", reply_to=replies.name,
                                 correlation_id=uuid.uuid4().hex),
                routing_key=Topology(prefix=prefix).completions_queue)
        received = 0
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while received < 9:
                message = await replies.get(fail=False, no_ack=True)
                if message is None:
                    await asyncio.sleep(0.02)
                    continue
                assert orjson.loads(message.body)["object"] == "chat.completion"
                received += 1
        await requester.close()
    assert fake.max_in_flight == 3
