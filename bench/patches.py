"""What-if patches: a proposed product fix, applied in the benchmark's worker process only.

`python -m bench run --patch NAME` runs the worker with NAME applied, so the
effect of a fix outside the files a benchmark may touch can be measured (and
re-measured) before anyone changes the product. Nothing here is imported by
the worker itself; RESULTS.md says when a run used a patch.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any


def ollama_stream_reuse() -> None:
    """providers/ollama.py `OllamaProvider.stream`: read the body to its end after `done`.

    As shipped, the generator returns on the `done` line, leaving the
    chunked body's terminating chunk unread; httpx then cannot put the
    connection back in its pool and closes it, so every event pays a new TCP
    connection to the provider (and the provider an accept). Reading on to
    the end of the body (Ollama sends nothing after `done`) keeps it pooled.
    """
    from providers import ollama
    from providers.base import ChatRequest, CompletionChunk
    from providers.errors import ProviderUnavailable
    from providers.http import bad_shape, parse_json, raise_for_status, transport_errors

    async def stream(
        self: ollama.OllamaProvider, request: ChatRequest
    ) -> AsyncGenerator[CompletionChunk, None]:
        body = self._body(request, stream=True)
        final: CompletionChunk | None = None
        with transport_errors(self.name):
            async with self._client.stream("POST", "/api/chat", json=body) as response:
                if not response.is_success:
                    await response.aread()
                    raise_for_status(self.name, response)
                async for line in response.aiter_lines():
                    if final is not None or not line.strip():
                        continue  # after `done`: read on to the end, so the connection is reused
                    data = parse_json(self.name, line)
                    if not isinstance(data, dict):
                        raise bad_shape(self.name, "stream line is not an object", data)
                    if "error" in data:
                        raise self._error(data["error"])
                    model = ollama._model(data, body["model"])
                    text = ollama._content(self.name, data)
                    if text:
                        yield CompletionChunk(text=text, model=model)
                    if data.get("done") is True:
                        final = CompletionChunk(model=model, usage=ollama._usage(data),
                                                finish_reason=ollama._finish_reason(data),
                                                done=True)
        if final is None:
            raise ProviderUnavailable(self.name, "stream ended early (no line with done=true)")
        yield final

    ollama.OllamaProvider.stream = stream  # type: ignore[method-assign]


def ollama_aiohttp() -> None:
    """providers/ollama.py: the same streamed `/api/chat`, through aiohttp instead of httpx.

    A sketch of the fix the profile points at, to measure it: httpx (httpcore,
    anyio, h11) costs ~0.75-0.87 ms of CPU per streamed request here, aiohttp
    (already a dependency, for the sidecar) ~0.08-0.11 ms (`python -m bench
    profile` and bench/README.md). Status and transport errors map to the
    same typed errors; TLS options and `list_models` stay on httpx.
    """
    import aiohttp
    import orjson

    from providers import ollama
    from providers.base import ChatRequest, CompletionChunk
    from providers.errors import ProviderTimeout, ProviderUnavailable
    from providers.http import bad_shape, error_detail, error_for_status, parse_json

    sessions: dict[int, aiohttp.ClientSession] = {}

    def session_of(provider: ollama.OllamaProvider) -> aiohttp.ClientSession:
        session = sessions.get(id(provider))
        if session is None:
            timeout_s = provider._client.timeout.read or 30.0
            session = aiohttp.ClientSession(
                base_url=str(provider._client.base_url).rstrip("/") + "/",
                connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0,
                                              sock_read=timeout_s))
            sessions[id(provider)] = session
        return session

    async def stream(
        self: ollama.OllamaProvider, request: ChatRequest
    ) -> AsyncGenerator[CompletionChunk, None]:
        body = self._body(request, stream=True)
        final: CompletionChunk | None = None
        try:
            async with session_of(self).post(
                    "api/chat", data=orjson.dumps(body),
                    headers={"content-type": "application/json"}) as response:
                if response.status >= 300:
                    raise error_for_status(self.name, response.status,
                                           error_detail(await response.read()))
                async for line in response.content:
                    if final is not None or not line.strip():
                        continue
                    data = parse_json(self.name, line)
                    if not isinstance(data, dict):
                        raise bad_shape(self.name, "stream line is not an object", data)
                    if "error" in data:
                        raise self._error(data["error"])
                    model = ollama._model(data, body["model"])
                    text = ollama._content(self.name, data)
                    if text:
                        yield CompletionChunk(text=text, model=model)
                    if data.get("done") is True:
                        final = CompletionChunk(model=model, usage=ollama._usage(data),
                                                finish_reason=ollama._finish_reason(data),
                                                done=True)
        except TimeoutError as exc:
            raise ProviderTimeout(self.name, "timed out") from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
        if final is None:
            raise ProviderUnavailable(self.name, "stream ended early (no line with done=true)")
        yield final

    original_close = ollama.OllamaProvider.aclose

    async def aclose(self: ollama.OllamaProvider) -> None:
        session = sessions.pop(id(self), None)
        if session is not None:
            await session.close()
        await original_close(self)

    ollama.OllamaProvider.stream = stream  # type: ignore[method-assign]
    ollama.OllamaProvider.aclose = aclose  # type: ignore[method-assign]


def redis_capped_pool() -> None:
    """The *old* context/redis_store.py `RedisStateStore.from_url`, to measure "before".

    Until the benchmark's fix, the store used redis-py's default pool, which
    (redis-py 6+) holds at most 100 connections and raises
    `MaxConnectionsError`, a `ConnectionError`, at once past that. The
    failover store took that for "Redis unreachable" and switched the replica
    to memory state whenever more than 100 events were in flight.
    """
    from redis.asyncio import Redis

    from context import redis_store

    def from_url(cls: type[redis_store.RedisStateStore], url: str, key_prefix: str,
                 **client_options: Any) -> redis_store.RedisStateStore:
        return cls(Redis.from_url(url, **client_options), key_prefix, owns_client=True)

    redis_store.RedisStateStore.from_url = classmethod(  # type: ignore[assignment]
        from_url)  # type: ignore[arg-type]


def gc_freeze() -> None:
    """worker/app.py `App.start`: `gc.freeze()` once started.

    Everything alive after start-up (modules, schemas, clients: most of the
    heap) moves to the permanent generation, so a full collection no longer
    walks it. As shipped, each full (gen2) collection of the running worker
    takes ~40 ms on this machine and stalls every event in flight meanwhile.
    """
    import gc

    from worker.app import App

    original = App.start

    async def start(self: App) -> None:
        await original(self)
        gc.collect()
        gc.freeze()

    App.start = start  # type: ignore[method-assign]


def gc_log() -> None:
    """Diagnostics, not a fix: every garbage collection over 5 ms, to the worker's stderr."""
    import gc
    import sys
    import time

    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
            return
        ms = (time.perf_counter() - started.get("t", 0.0)) * 1000
        if ms > 5:
            print(f"gc: generation {info['generation']} took {ms:.1f} ms, "
                  f"collected {info['collected']}", file=sys.stderr, flush=True)

    gc.callbacks.append(callback)


PATCHES: dict[str, Callable[[], Any]] = {
    "ollama-stream-reuse": ollama_stream_reuse,
    "ollama-aiohttp": ollama_aiohttp,
    "redis-capped-pool": redis_capped_pool,
    "gc-freeze": gc_freeze,
    "gc-log": gc_log,
}


def apply(names: list[str]) -> None:
    for name in names:
        PATCHES[name]()

