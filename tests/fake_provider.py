"""A real HTTP fake of Ollama's and OpenAI's chat APIs, for tests and benchmarks.

Real sockets rather than mocked transports: timeouts, connection pooling,
NDJSON line splitting and SSE decoding only behave as in production when bytes
really cross a socket. Every failure the providers must classify can be
injected, either as the default behaviour or as a FIFO script of one-shot
behaviours ("fail twice, then answer").

    async with FakeProvider() as fake:          # fake.url -> http://127.0.0.1:PORT
        fake.latency_s = 2.0                    # default behaviour, mutable
        fake.script = [Behaviour(status=500)]   # the next request fails, then default
        await fake.go_down()                    # an outage: connections are refused
        await fake.come_back()                  # listening again, on the same port

Standalone, for benchmarks and manual use:

    python -m tests.fake_provider --port 11434 --latency 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

import orjson
from aiohttp import web
from multidict import CIMultiDict

DEFAULT_REPLY = "Hello there, friend!"
DEFAULT_MODELS = ("llama3.2:latest", "qwen3:0.6b")
GARBAGE = "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"

Reply = str | Callable[[list[dict[str, Any]]], str]
Api = Literal["ollama", "openai"]

_DEFAULT_ERRORS = {
    400: "invalid request: messages must not be empty",
    401: "invalid API key",
    404: "model not found, try pulling it first",
    429: "rate limit exceeded, slow down",
    500: "internal server error",
    503: "server overloaded, try again later",
}


@dataclass
class Behaviour:
    """How the fake answers one request."""

    reply_text: Reply = DEFAULT_REPLY
    # Before anything is sent, headers included: > the client's timeout = a timeout.
    latency_s: float = 0.0
    # Between streamed chunks: a slow but steady generation.
    chunk_delay_s: float = 0.0
    # An error status with the API's own error body (Ollama- or OpenAI-shaped).
    status: int | None = None
    error_message: str | None = None
    retry_after: str | None = None
    # 200 with a body that is not the protocol (an HTML page; a non-JSON line/event).
    garbage: bool = False
    # Streams only: a few chunks, then an error line / error event.
    midstream_error: bool = False
    # Streams only: a few chunks, then the end, without done / finish_reason / [DONE].
    truncate_stream: bool = False
    # Reasoning text: Ollama `message.thinking`, OpenAI `reasoning_content`.
    thinking: str | None = None
    # Ollama only: a thinking model as Ollama runs one. Unless the request says
    # `think: false`, it reasons until `num_predict` is spent and answers nothing.
    thinking_model: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # case-insensitive
    json: Any  # None when the body is empty or not JSON


T = TypeVar("T")


class _DefaultField(Generic[T]):
    """`fake.latency_s = 2` reads and writes the default `Behaviour`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: FakeProvider | None, objtype: type | None = None) -> T:
        if obj is None:
            raise AttributeError(self._name)
        value: T = getattr(obj.default, self._name)
        return value

    def __set__(self, obj: FakeProvider, value: T) -> None:
        setattr(obj.default, self._name, value)


class FakeProvider:
    """Ollama (`/api/chat`, `/api/tags`) and OpenAI (`/v1/chat/completions`,
    `/v1/models`) on one loopback port."""

    reply_text: _DefaultField[Reply] = _DefaultField()
    latency_s: _DefaultField[float] = _DefaultField()
    chunk_delay_s: _DefaultField[float] = _DefaultField()
    status: _DefaultField[int | None] = _DefaultField()
    error_message: _DefaultField[str | None] = _DefaultField()
    retry_after: _DefaultField[str | None] = _DefaultField()
    garbage: _DefaultField[bool] = _DefaultField()
    midstream_error: _DefaultField[bool] = _DefaultField()
    truncate_stream: _DefaultField[bool] = _DefaultField()
    thinking: _DefaultField[str | None] = _DefaultField()
    thinking_model: _DefaultField[bool] = _DefaultField()

    def __init__(
        self,
        default: Behaviour | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Sequence[str] = DEFAULT_MODELS,
        record: bool = True,
    ) -> None:
        self.default = default or Behaviour()
        self.script: list[Behaviour] = []
        self.models = list(models)
        # Chat requests; health checks (GET /api/tags, /v1/models) are kept apart,
        # so a worker's own probes never shift what a test reads in `requests`.
        self.requests: list[RecordedRequest] = []
        self.health_requests: list[RecordedRequest] = []
        # Chat requests (what costs a generation); health checks are counted apart.
        self.calls = 0
        self.health_calls = 0
        # Chat requests being answered right now, and the most seen at once.
        self.in_flight = 0
        self.max_in_flight = 0
        # The client address of every request: one per TCP connection, so
        # its size tells whether the client reused pooled connections.
        self.peers: set[tuple[str, int]] = set()
        # A long benchmark would otherwise keep every request body in memory.
        self.record = record
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Listen and return the base URL (`http://127.0.0.1:PORT`)."""
        app = web.Application(middlewares=[self._count_in_flight])
        app.router.add_post("/api/chat", self._ollama_chat)
        app.router.add_get("/api/tags", self._ollama_tags)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_get("/v1/models", self._openai_models)
        # Cancel a handler when its client gives up, so a request that timed
        # out does not keep sleeping and hold `stop()` up.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        # aiohttp's default backlog (128) drops SYNs when hundreds of clients
        # connect at once; the retransmit then looks like a connect timeout.
        site = web.TCPSite(self._runner, self._host, self._port, backlog=2048)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def down(self) -> bool:
        return self._runner is None and bool(self.url)

    async def go_down(self) -> None:
        """An outage as clients see one: the port stops listening (connection refused).

        Requests in progress are cut off. `come_back()` listens on the same port.
        """
        assert self.url, "start() first"
        self._port = int(self.url.rsplit(":", 1)[1])
        await self.stop()

    async def come_back(self) -> None:
        """Listen again on the port the fake had before `go_down()`."""
        assert self.down, "go_down() first"
        await self.start()

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    # -- plumbing ----------------------------------------------------------

    @web.middleware
    async def _count_in_flight(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if self.record and request.transport is not None:
            host, port = request.transport.get_extra_info("peername")[:2]
            self.peers.add((host, port))
        if request.method != "POST":
            return await handler(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _begin(self, request: web.Request) -> tuple[Behaviour, Any]:
        """Record the request, pick its behaviour, and wait out the latency."""
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if request.method == "POST":
            self.calls += 1
        else:
            self.health_calls += 1
        if self.record:
            recorded = RecordedRequest(
                request.method, request.path, CIMultiDict(request.headers), body)
            if request.method == "POST":
                self.requests.append(recorded)
            else:
                self.health_requests.append(recorded)
        # The script is for chat requests: a health check (a worker's start-up
        # probe, a circuit's probe) answers as the default does, and leaves it.
        scripted = self.script and request.method == "POST"
        behaviour = self.script.pop(0) if scripted else self.default
        if behaviour.latency_s > 0:
            await asyncio.sleep(behaviour.latency_s)
        return behaviour, body

    def _error(self, api: Api, behaviour: Behaviour, model: str) -> web.Response:
        status = behaviour.status or 500
        message = behaviour.error_message or _DEFAULT_ERRORS.get(status, f"HTTP {status}")
        if status == 404 and behaviour.error_message is None:
            message = f'model "{model}" not found, try pulling it first'
        headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else None
        payload: dict[str, Any]
        if api == "ollama":
            payload = {"error": message}
        else:
            kind = "invalid_request_error" if status < 500 else "server_error"
            payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return _json(payload, status=status, headers=headers)

    # -- Ollama ------------------------------------------------------------

    async def _ollama_tags(self, request: web.Request) -> web.StreamResponse:
        behaviour, _ = await self._begin(request)
        if behaviour.status is not None:
            return self._error("ollama", behaviour, "")
        if behaviour.garbage:
            return _garbage()
        return _json({"models": [{"name": m, "model": m, "size": 1} for m in self.models]})

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        behaviour, body = await self._begin(request)
        body = body if isinstance(body, dict) else {}
        model = str(body.get("model", ""))
        if behaviour.status is not None:
            return self._error("ollama", behaviour, model)
        refused = _ollama_refusal(body)
        if refused is not None:
            return _json({"error": refused}, status=400)
        options = body.get("options")
        options = options if isinstance(options, dict) else {}
        spent_thinking = behaviour.thinking_model and body.get("think") is not False
        if spent_thinking:
            behaviour = _spends_budget_thinking(behaviour, options.get("num_predict"))
        answer = _Answer.make(behaviour, body.get("messages"), options.get("num_predict"))
        if spent_thinking:
            answer.finish_reason = "length"
        if not body.get("stream", True):  # Ollama streams unless told otherwise
            if behaviour.garbage:
                return _garbage()
            message: dict[str, Any] = {"role": "assistant", "content": answer.text}
            if behaviour.thinking:
                message["thinking"] = behaviour.thinking
            return _json(_ollama_line(model, message, done=True, answer=answer))

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def send(line: dict[str, Any]) -> None:
            await response.write(orjson.dumps(line) + b"\n")

        if behaviour.garbage:
            await response.write(b"this line is not JSON\n")
            return response
        for piece in _pieces(behaviour.thinking or ""):
            await send(_ollama_line(model, {"role": "assistant", "content": "", "thinking": piece}))
        for piece in answer.sent(behaviour):
            await send(_ollama_line(model, {"role": "assistant", "content": piece}))
            if behaviour.chunk_delay_s > 0:
                await asyncio.sleep(behaviour.chunk_delay_s)
        if behaviour.midstream_error:
            await send({"error": "an error was encountered while running the model"})
        if behaviour.midstream_error or behaviour.truncate_stream:
            return response
        await send(
            _ollama_line(model, {"role": "assistant", "content": ""}, done=True, answer=answer)
        )
        await response.write_eof()
        return response

    # -- OpenAI ------------------------------------------------------------

    async def _openai_models(self, request: web.Request) -> web.StreamResponse:
        behaviour, _ = await self._begin(request)
        if behaviour.status is not None:
            return self._error("openai", behaviour, "")
        if behaviour.garbage:
            return _garbage()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return _json({"object": "list", "data": data})

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        behaviour, body = await self._begin(request)
        body = body if isinstance(body, dict) else {}
        requested = str(body.get("model", "auto"))
        # A proxy resolves "auto" to a real model, steered by X-Preferred-Model.
        model = requested
        if requested == "auto":
            model = request.headers.get("X-Preferred-Model") or self.models[0]
        if behaviour.status is not None:
            return self._error("openai", behaviour, requested)
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        answer = _Answer.make(behaviour, body.get("messages"), limit)
        ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if not body.get("stream", False):
            if behaviour.garbage:
                return _garbage()
            message: dict[str, Any] = {"role": "assistant", "content": answer.text}
            if behaviour.thinking:
                message["reasoning_content"] = behaviour.thinking
            choice = {"index": 0, "message": message, "finish_reason": answer.finish_reason}
            return _json(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": answer.usage(),
                }
            )

        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(data: Any) -> None:
            payload = data if isinstance(data, str) else orjson.dumps(data).decode()
            await response.write(f"data: {payload}\n\n".encode())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            if include_usage:
                out["usage"] = None
            return out

        if behaviour.garbage:
            await send("<html>this event is not JSON</html>")
            return response
        await send(chunk({"role": "assistant", "content": ""}))
        for piece in _pieces(behaviour.thinking or ""):
            await send(chunk({"reasoning_content": piece}))
        for piece in answer.sent(behaviour):
            await send(chunk({"content": piece}))
            if behaviour.chunk_delay_s > 0:
                await asyncio.sleep(behaviour.chunk_delay_s)
        if behaviour.midstream_error:
            await send({"error": {"message": "upstream model crashed", "type": "server_error"}})
        if behaviour.midstream_error or behaviour.truncate_stream:
            return response
        await send(chunk({}, answer.finish_reason))
        if include_usage:
            await send(
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": answer.usage(),
                }
            )
        await send("[DONE]")
        await response.write_eof()
        return response


@dataclass
class _Answer:
    """The reply for one request, cut to the token limit; words stand in for tokens."""

    pieces: list[str]
    prompt_tokens: int
    finish_reason: str

    @classmethod
    def make(cls, behaviour: Behaviour, messages: Any, limit: Any) -> _Answer:
        if not isinstance(messages, list):
            messages = []
        messages = [m for m in messages if isinstance(m, dict)]
        reply = behaviour.reply_text
        text = reply(messages) if callable(reply) else reply
        pieces = _pieces(text)
        finish_reason = "stop"
        if isinstance(limit, int) and 0 < limit < len(pieces):
            pieces, finish_reason = pieces[:limit], "length"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        return cls(pieces, prompt_tokens, finish_reason)

    def sent(self, behaviour: Behaviour) -> list[str]:
        """The pieces a stream sends: about half when the stream is to break."""
        if behaviour.midstream_error or behaviour.truncate_stream:
            return self.pieces[: max(1, len(self.pieces) // 2)]
        return self.pieces

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> dict[str, int]:
        completion = len(self.pieces)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


_GO_DURATION = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+|[-+]?0")


def _ollama_refusal(body: dict[str, Any]) -> str | None:
    """Ollama's own 400s for the fields it parses strictly (api.Duration, api.ThinkValue)."""
    keep_alive = body.get("keep_alive")
    if isinstance(keep_alive, str) and not _GO_DURATION.fullmatch(keep_alive):
        if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", keep_alive):
            return f'time: missing unit in duration "{keep_alive}"'
        return f'time: invalid duration "{keep_alive}"'
    think = body.get("think")
    if think is not None and not isinstance(think, bool) and think not in (
            "low", "medium", "high"):
        return f"invalid think value: {think!r}"
    return None


def _spends_budget_thinking(behaviour: Behaviour, num_predict: Any) -> Behaviour:
    """What a thinking model does with think left on: reasoning until the budget is gone."""
    budget = num_predict if isinstance(num_predict, int) and num_predict > 0 else 64
    return Behaviour(
        reply_text="", thinking=" ".join(["Hmm, let me think."] * budget),
        latency_s=0.0, chunk_delay_s=behaviour.chunk_delay_s)


def _pieces(text: str) -> list[str]:
    """Word-sized stream chunks that join back into the text ("Hello", " there,")."""
    return re.findall(r"\s*\S+", text)


def _ollama_line(
    model: str, message: dict[str, Any], *, done: bool = False, answer: _Answer | None = None
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "model": model,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "message": message,
        "done": done,
    }
    if done and answer is not None:
        line |= {
            "done_reason": answer.finish_reason,
            "total_duration": 1_000_000,
            "load_duration": 1_000,
            "prompt_eval_count": answer.prompt_tokens,
            "eval_count": len(answer.pieces),
        }
    return line


def _json(
    payload: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


def _garbage() -> web.Response:
    return web.Response(text=GARBAGE, status=200, content_type="text/html")


async def _serve(fake: FakeProvider) -> None:
    url = await fake.start()
    print(f"fake Ollama/OpenAI provider listening on {url}  (Ctrl-C to stop)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fake_provider",
        description="A fake Ollama + OpenAI-compatible chat server for benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="the text every answer carries")
    parser.add_argument("--model", action="append", help="a model to list (repeatable)")
    args = parser.parse_args(argv)
    behaviour = Behaviour(
        reply_text=args.reply, latency_s=args.latency, chunk_delay_s=args.chunk_delay
    )
    fake = FakeProvider(
        behaviour,
        host=args.host,
        port=args.port,
        models=args.model or DEFAULT_MODELS,
        record=False,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(fake))


if __name__ == "__main__":
    main()
