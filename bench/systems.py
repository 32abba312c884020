"""The systems under test, each run by `python -m bench serve SYSTEM CONFIG` in its own process.

- `floor`: bare aio-pika doing the minimum of the worker's job. It is what
  any consumer of this broker, in this language, must pay: validate the event
  with the project's own schema, one pooled HTTP call to the provider, one
  confirmed persistent publish to the topic exchange, one ack.
- `faststream`: the same handler in FastStream (logging off), which does the
  consuming, acking and publishing its own way.
- `worker`: the worker as shipped, `App.build(settings)` + `start()`.

Each prints `{"ready": true}` once it consumes and stops on SIGTERM. Same
prefetch and concurrency for all three; the same event loop too (uvloop when
installed, as `waddle-ai run` uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import orjson

from bench.common import PERSONA, topology
from schemas.events import parse_event


@dataclass(frozen=True)
class ServeConfig:
    system: str
    amqp_url: str
    prefix: str
    provider_url: str
    concurrency: int
    # Worker only: Settings fields on top of the benchmark's defaults.
    worker: dict[str, Any] | None = None
    # Worker only: what-if patches (bench/patches.py) applied before it is built.
    patches: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, raw: str) -> ServeConfig:
        data = orjson.loads(raw)
        data["patches"] = tuple(data.get("patches") or ())
        return cls(**data)

    def to_json(self) -> str:
        return orjson.dumps(self.__dict__).decode()


class Answerer:
    """The floor's and FastStream's handler: validate, ask the provider, build the reply.

    The provider call is Ollama's non-streamed `/api/chat` through one pooled
    aiohttp session (as many connections as events in flight), the HTTP
    client the worker uses: the least a consumer must do to get an answer.
    """

    def __init__(self, provider_url: str, concurrency: int) -> None:
        self._url = provider_url.rstrip("/") + "/api/chat"
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=30.0))

    async def __call__(self, body: bytes) -> tuple[str, str, bytes]:
        """(routing key, event id, reply body) for one event body."""
        event = parse_event(body)
        request = {
            "model": "llama3.2",
            "messages": [{"role": "system", "content": PERSONA},
                         {"role": "user", "content": event.message_content}],
            "stream": False,
        }
        async with self._client.post(
                self._url, data=orjson.dumps(request),
                headers={"content-type": "application/json"}) as response:
            response.raise_for_status()
            answer = orjson.loads(await response.read())
        reply = {
            "schema_version": 1,
            "event_id": event.event_id,
            "session_id": event.effective_session_id,
            "community_id": event.community_id,
            "platform": event.platform.value,
            "channel_id": event.channel_id,
            "user_id": event.user_id,
            "response_action": "chat",
            "response": answer["message"]["content"],
            "trigger": "greeting",
            "provider": "ollama",
            "model": answer.get("model", "llama3.2"),
            "usage": {"prompt_tokens": answer.get("prompt_eval_count", 0),
                      "completion_tokens": answer.get("eval_count", 0)},
            "processing_time_ms": 0,
            "created_at": datetime.now(UTC).isoformat(),
        }
        routing_key = f"{event.platform.value}.{event.community_id}"
        return routing_key, event.event_id, orjson.dumps(reply)

    async def aclose(self) -> None:
        await self._client.close()


async def serve_floor(config: ServeConfig, stop: asyncio.Event, ready: Callable[[], None]) -> None:
    topo = topology(config.prefix)
    answer = Answerer(config.provider_url, config.concurrency)
    connection = await aio_pika.connect(config.amqp_url)
    try:
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=config.concurrency)
        publish_channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
        exchange = await publish_channel.get_exchange(topo.responses_exchange, ensure=False)
        queue = await consume_channel.get_queue(topo.interaction_queue, ensure=False)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            routing_key, event_id, reply = await answer(message.body)
            await exchange.publish(
                aio_pika.Message(
                    body=reply, content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    correlation_id=event_id, message_id=f"reply:{event_id}"),
                routing_key=routing_key, mandatory=True)
            await message.ack()

        tag = await queue.consume(on_message)
        ready()
        await stop.wait()
        await queue.cancel(tag)
    finally:
        await connection.close()
        await answer.aclose()


async def serve_faststream(
    config: ServeConfig, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    from faststream.rabbit import (
        Channel,
        ExchangeType,
        QueueType,
        RabbitBroker,
        RabbitExchange,
        RabbitMessage,
        RabbitQueue,
    )

    topo = topology(config.prefix)
    answer = Answerer(config.provider_url, config.concurrency)
    # logger=None: FastStream logs every message by default; the others do not here.
    broker = RabbitBroker(config.amqp_url, logger=None)
    queue = RabbitQueue(topo.interaction_queue, queue_type=QueueType.QUORUM, durable=True,
                        arguments=topo.interaction_arguments())  # type: ignore[call-overload]
    responses = RabbitExchange(topo.responses_exchange, type=ExchangeType.TOPIC, durable=True)

    @broker.subscriber(queue, channel=Channel(prefetch_count=config.concurrency))
    async def handle(message: RabbitMessage) -> None:
        routing_key, event_id, reply = await answer(message.body)
        await broker.publish(
            reply, exchange=responses, routing_key=routing_key, persist=True, mandatory=True,
            content_type="application/json", correlation_id=event_id,
            message_id=f"reply:{event_id}")
        # Acked by FastStream when the handler returns (its default policy).

    await broker.start()
    try:
        ready()
        await stop.wait()
    finally:
        await broker.stop()
        await answer.aclose()


async def serve_worker(config: ServeConfig, stop: asyncio.Event, ready: Callable[[], None]) -> None:
    from bench.patches import apply
    from config.settings import Settings
    from worker.app import App

    apply(list(config.patches))

    values: dict[str, Any] = {
        "amqp_url": config.amqp_url,
        "queue_prefix": config.prefix,
        "ai_provider": "ollama",
        "ollama_host": config.provider_url,
        "user_cooldown_s": 0,
        "channel_cooldown_s": 0,
        "max_concurrent_requests": config.concurrency,
        "prefetch_count": config.concurrency,
        "sidecar_host": "127.0.0.1",
        "sidecar_port": 0,
        "_env_file": None,
    }
    values.update(config.worker or {})
    app = await App.build(Settings(**values))
    try:
        await app.start()
        ready()
        await stop.wait()
    finally:
        await app.stop()


SYSTEMS: dict[str, Callable[[ServeConfig, asyncio.Event, Callable[[], None]], Awaitable[None]]] = {
    "floor": serve_floor,
    "faststream": serve_faststream,
    "worker": serve_worker,
}


def install_fast_loop() -> str:
    """uvloop when installed, as `waddle-ai run` does; the name of the loop in use."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _say(payload: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(payload).decode() + "\n")
    sys.stdout.flush()


async def _stop_when_stdin_closes(stop: asyncio.Event) -> None:
    """The harness holds our stdin: if it dies, however, we stop too and leave nothing behind."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    stop.set()


async def serve(config: ServeConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = asyncio.create_task(_stop_when_stdin_closes(stop))
    try:
        await SYSTEMS[config.system](config, stop, lambda: _say({"ready": True}))
    finally:
        watcher.cancel()
    _say({"stopped": True})


def main(raw_config: str) -> int:
    install_fast_loop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(ServeConfig.from_json(raw_config)))
    return 0
