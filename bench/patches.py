"""What-if patches, applied in the benchmark's worker process only.

`python -m bench run --patch NAME` runs the worker with NAME applied. The
patches put back what a fix replaced, so "before" can be re-measured next to
"after" on the same broker in the same run. Nothing here is imported by the
worker itself; RESULTS.md says when a run used a patch.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any


def httpx_provider() -> None:
    """providers/ollama.py `OllamaProvider.stream` as it was before the move to aiohttp.

    To measure "before" in the same run as "after": the streamed `/api/chat`
    through one pooled httpx client (the old `build_client` limits), returning
    on the `done` line without reading the body's end, so httpx closed the
    connection and every event paid a new one. Needs `httpx` (the `bench` extra).
    """
    import httpx

    from providers import ollama
    from providers.base import ChatRequest, CompletionChunk
    from providers.errors import ProviderTimeout, ProviderUnavailable
    from providers.http import bad_shape, error_detail, error_for_status, parse_json

    clients: dict[int, httpx.AsyncClient] = {}

    def client_of(provider: ollama.OllamaProvider) -> httpx.AsyncClient:
        client = clients.get(id(provider))
        if client is None:
            timeouts = provider._client.timeout
            client = clients[id(provider)] = httpx.AsyncClient(
                base_url=provider._client.base_url,
                timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100,
                                    keepalive_expiry=30.0))
        return client

    async def stream(
        self: ollama.OllamaProvider, request: ChatRequest
    ) -> AsyncGenerator[CompletionChunk, None]:
        body = self._body(request, stream=True)
        try:
            async with client_of(self).stream("POST", "/api/chat", json=body) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_for_status(self.name, response.status_code,
                                           error_detail(response.content))
                async for line in response.aiter_lines():
                    if not line.strip():
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
                        yield CompletionChunk(model=model, usage=ollama._usage(data),
                                              finish_reason=ollama._finish_reason(data),
                                              done=True)
                        return
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(self.name, "timed out") from exc
        except httpx.RequestError as exc:
            raise ProviderUnavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
        raise ProviderUnavailable(self.name, "stream ended early (no line with done=true)")

    original_close = ollama.OllamaProvider.aclose

    async def aclose(self: ollama.OllamaProvider) -> None:
        client = clients.pop(id(self), None)
        if client is not None:
            await client.aclose()
        await original_close(self)

    ollama.OllamaProvider.stream = stream  # type: ignore[method-assign]
    ollama.OllamaProvider.aclose = aclose  # type: ignore[method-assign]


def redis_capped_pool() -> None:
    """The *old* Redis client (redis-py's default pool), to measure "before".

    Until the benchmark's fix, the store used redis-py's default pool, which
    (redis-py 6+) holds at most 100 connections and raises
    `MaxConnectionsError`, a `ConnectionError`, at once past that. The
    failover store took that for "Redis unreachable" and switched the replica
    to memory state whenever more than 100 events were in flight. The
    worker's one Redis client is made in `worker.app.build_redis_link`
    through `pooled_client`; this puts the default pool back there.
    """
    from redis.asyncio import Redis

    from worker import app

    def default_pool(url: str, *, pool_wait_s: float = 0.0, **client_options: Any) -> Redis:
        return Redis.from_url(url, **client_options)

    app.pooled_client = default_pool  # type: ignore[attr-defined]


def no_gc_freeze() -> None:
    """worker/app.py `App.start` without its `gc.freeze()`, to measure "before".

    Unfrozen, the start-up heap (modules, schemas, clients) stays in the
    collector's sight, and each full collection walks it while every event in
    flight waits (~40 ms on the 2-core machine of RESULTS.md).
    """
    import gc

    from worker.app import App

    original = App.start

    async def start(self: App) -> None:
        await original(self)
        gc.unfreeze()

    App.start = start  # type: ignore[method-assign]


def gc_log() -> None:
    """Diagnostics, not a fix: every garbage collection over 5 ms, to the worker's stderr."""
    import gc
    import sys
    import time
    from collections import Counter

    from worker.app import App

    started: dict[str, float] = {}
    modules_at_start: set[str] = set()
    original = App.start

    async def start(self: App) -> None:
        await original(self)
        modules_at_start.update(sys.modules)

    App.start = start  # type: ignore[method-assign]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
            return
        ms = (time.perf_counter() - started.get("t", 0.0)) * 1000
        if ms > 5:
            # What the slow collection walked: the oldest generation, by type.
            census = Counter(type(o).__name__ for o in gc.get_objects(2))
            if not modules_at_start:
                print(f"gc: generation {info['generation']} took {ms:.1f} ms during start-up",
                      file=sys.stderr, flush=True)
                return
            since_start = sorted(set(sys.modules) - modules_at_start)
            print(f"gc: generation {info['generation']} took {ms:.1f} ms, "
                  f"collected {info['collected']}; {census.total()} objects in generation 2, "
                  f"{gc.get_freeze_count()} frozen, "
                  f"most: {census.most_common(8)}; modules imported since start: "
                  f"{since_start}", file=sys.stderr, flush=True)

    gc.callbacks.append(callback)


def loop_lag() -> None:
    """Diagnostics, not a fix: every event-loop stall over 20 ms, to the worker's stderr.

    A 5 ms timer that fires late by more than 20 ms means the loop was held up.
    The process's CPU time over the stall tells which way: about the stall's
    length means our own code ran without yielding; near zero means the
    process was not running at all (the machine was busy elsewhere).
    """
    import asyncio
    import sys
    import time

    from worker.app import App

    original = App.start

    async def watch() -> None:
        while True:
            wall, cpu = time.perf_counter(), time.process_time()
            await asyncio.sleep(0.005)
            lag_ms = (time.perf_counter() - wall) * 1000 - 5
            if lag_ms > 20:
                cpu_ms = (time.process_time() - cpu) * 1000
                print(f"lag: loop held up {lag_ms:.1f} ms, process CPU meanwhile "
                      f"{cpu_ms:.1f} ms", file=sys.stderr, flush=True)

    async def start(self: App) -> None:
        await original(self)
        tasks.append(asyncio.get_running_loop().create_task(watch()))

    tasks: list[asyncio.Task[None]] = []
    App.start = start  # type: ignore[method-assign]


PATCHES: dict[str, Callable[[], Any]] = {
    "httpx-provider": httpx_provider,
    "no-gc-freeze": no_gc_freeze,
    "redis-capped-pool": redis_capped_pool,
    "gc-log": gc_log,
    "loop-lag": loop_lag,
}


def apply(names: list[str]) -> None:
    for name in names:
        PATCHES[name]()

