"""HTTP plumbing shared by the Ollama and OpenAI-compatible providers.

Both providers must turn the same transport failures into the same typed
errors, or the retry layer would treat Ollama and WaddleAI differently for the
same outage. Everything that decides "retry or dead letter" for an HTTP answer
lives here, once.

The client is aiohttp's: a streamed request through it costs about a tenth
of the CPU that httpx's does (bench/RESULTS.md), and at hundreds of replies
in flight that is most of a worker's CPU.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import os
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from yarl import URL

from providers.errors import (
    ProviderAuthFailed,
    ProviderBadOutput,
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)

# Sized for hundreds of replies in flight at once: a smaller pool would queue
# requests in the client, where the wait counts against the provider's timeout.
MAX_CONNECTIONS = 1000
KEEPALIVE_S = 30.0
# The longest line a provider may send (NDJSON or event stream), in decoded
# characters. A backend that never ends a line must not grow the buffer without bound.
MAX_LINE_CHARS = 1 << 20
# How long a finished answer waits for the rest of its body (the end of the
# chunked encoding) so that its connection can be pooled again.
DRAIN_GRACE_S = 0.5
EXCERPT_CHARS = 200
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """`read` bounds each wait for data (a stalled stream), `connect` a new connection."""

    read: float
    connect: float


class HttpClient:
    """One provider's pooled connections to one base URL.

    The aiohttp session is made on first use: a session belongs to the event
    loop it was made in, and providers are built before (and outside) it.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float,
        *,
        verify: bool | str = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Connecting gets a short budget of its own: a backend that is down
        # should fail in seconds (so a fallback can answer), while a slow
        # generation may use the whole timeout.
        self.timeout = Timeouts(read=timeout_s, connect=min(5.0, timeout_s))
        self._ssl = ssl_verify(verify)
        self._headers = dict(headers or {})
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> URL:
        """Parsed once per path: yarl's parsing is a visible cost per request."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_S, ssl=self._ssl
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    # Waiting for a free pooled connection counts too.
                    connect=self.timeout.read,
                    sock_connect=self.timeout.connect,
                    sock_read=self.timeout.read,
                ),
                headers=self._headers,
            )
        return self._session

    @asynccontextmanager
    async def send(
        self,
        provider: str,
        method: str,
        path: str,
        *,
        body: Any = None,
        accept: str | None = None,
        secrets: Iterable[str] = (),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status, its body not yet read.

        Any other status raises the typed error for it, with the backend's own
        message; transport failures raise theirs.
        """
        data = orjson.dumps(body) if body is not None else None
        headers = JSON_HEADERS if data is not None else {}
        if accept is not None:
            headers = {**headers, "Accept": accept}
        with transport_errors(provider, self.base_url):
            async with self.session().request(
                method,
                self.url(path),
                data=data,
                headers=headers,
                # A redirect means a misconfigured URL; following it could
                # send the API key to another host.
                allow_redirects=False,
            ) as response:
                if not 200 <= response.status < 300:
                    detail = error_detail(await response.read(), secrets)
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    raise error_for_status(
                        provider, response.status, detail, retry_after_s=retry_after
                    )
                yield response

    async def request_json(
        self,
        provider: str,
        method: str,
        path: str,
        *,
        body: Any = None,
        secrets: Iterable[str] = (),
    ) -> Any:
        """The parsed JSON of a 2xx answer."""
        async with self.send(provider, method, path, body=body, secrets=secrets) as response:
            with transport_errors(provider, self.base_url):
                content = await response.read()
        return parse_json(provider, content, secrets)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def drain(response: aiohttp.ClientResponse, grace_s: float = DRAIN_GRACE_S) -> None:
    """Read the rest of a body whose answer is already whole.

    Only a body read to its end lets aiohttp pool the connection for the next
    reply. A server that holds the body open after its last event must not
    fail a complete answer: after `grace_s` its connection is dropped instead.
    """
    content = response.content
    if content.at_eof():
        return  # the usual case: the end came with the last event
    try:
        async with asyncio.timeout(grace_s):
            while await content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError):
        response.close()


def ssl_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """True/False, or a CA file or directory as an SSL context: checked now, not at first use."""
    if isinstance(verify, bool):
        return verify
    try:
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"CA certificate {verify!r} cannot be used: {exc}") from exc


@contextmanager
def transport_errors(provider: str, base_url: str | None = None) -> Iterator[None]:
    """Map aiohttp's transport failures to the provider errors the retry layer knows.

    With `base_url`, a failure to connect names the address, in words an
    operator reads at a glance ("connection refused to http://localhost:11434"):
    that line ends up in dead letters, refusals and the start-up warning.
    """
    try:
        yield
    except TimeoutError as exc:
        # aiohttp's own timeouts (ServerTimeoutError, ConnectionTimeoutError)
        # are TimeoutErrors too.
        where = f" ({base_url})" if base_url else ""
        raise ProviderTimeout(provider, f"timed out{where} ({type(exc).__name__})") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ProviderUnavailable(provider, connect_failure(exc, base_url)) from exc
    except aiohttp.ClientError as exc:
        # Connection refused, reset, a malformed chunk...: the backend may be
        # back on the next attempt. str(exc) carries no header, so no API key.
        detail = str(exc) or type(exc).__name__
        raise ProviderUnavailable(provider, f"{type(exc).__name__}: {detail}") from exc


def connect_failure(exc: aiohttp.ClientConnectorError, base_url: str | None) -> str:
    """`connection refused to http://host:port (…)`: what failed, where, and the OS's words."""
    where = base_url or f"{exc.host}:{exc.port}"
    cause = exc.os_error
    if isinstance(cause, ConnectionRefusedError):
        what = "connection refused"
    elif isinstance(cause, TimeoutError):
        what = "connection timed out"
    elif type(exc).__name__ == "ClientConnectorDNSError" or "name" in str(cause).lower():
        return f"cannot resolve the host of {where} ({cause.strerror or cause})"
    else:
        what = "cannot connect"
    return f"{what} to {where} ({cause.strerror or cause})"


async def iter_lines(provider: str, response: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    """The body's lines as they arrive, ended by LF, CRLF or a lone CR, decoded as UTF-8."""
    splitter = LineSplitter()
    with transport_errors(provider):
        async for chunk in response.content.iter_any():
            lines = splitter.feed(chunk)
            if splitter.pending > MAX_LINE_CHARS:
                raise ProviderBadOutput(
                    provider, f"a line longer than {MAX_LINE_CHARS} characters"
                )
            for line in lines:
                yield line
    for line in splitter.close():
        yield line


_EOL = re.compile(r"\r\n|\r|\n")


class LineSplitter:
    """Incremental line splitting for streamed bodies.

    aiohttp's own `readline` knows only LF and caps a line at 128 KiB with a
    bare ValueError; event streams may end lines with a lone CR.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[str]:
        return self._split(self._buffer + self._decoder.decode(chunk), final=False)

    def close(self) -> list[str]:
        lines = self._split(self._buffer + self._decoder.decode(b"", final=True), final=True)
        if self._buffer:
            lines.append(self._buffer)
            self._buffer = ""
        return lines

    def _split(self, text: str, *, final: bool) -> list[str]:
        lines: list[str] = []
        start = 0
        for match in _EOL.finditer(text):
            if match.group() == "\r" and match.end() == len(text) and not final:
                break  # maybe the first half of a CRLF split across chunks
            lines.append(text[start : match.start()])
            start = match.end()
        self._buffer = text[start:]
        return lines


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


class SSEDecoder:
    """Lines of a `text/event-stream` into events, as the WHATWG spec dispatches them.

    Written here because the maintained parser (httpx-sse) reads only httpx
    responses; this is the spec's algorithm for the fields OpenAI streams use.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._first = True

    def decode(self, line: str) -> ServerSentEvent | None:
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment: keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # `id` and `retry` matter only to a client that reconnects; this one retries instead.
        return None


async def iter_sse(
    provider: str, response: aiohttp.ClientResponse
) -> AsyncGenerator[ServerSentEvent, None]:
    """The events of a 2xx event-stream answer; any other content type is bad output."""
    if response.content_type != "text/event-stream":
        raise ProviderBadOutput(
            provider, f"not an event stream: content type {response.content_type!r}"
        )
    decoder = SSEDecoder()
    async for line in iter_lines(provider, response):
        event = decoder.decode(line)
        if event is not None:
            yield event


def error_for_status(
    provider: str,
    status: int,
    detail: str,
    *,
    retry_after_s: float | None = None,
) -> ProviderError:
    """The typed error for an HTTP status (also used for the embedded model's error codes)."""
    if status == 429:
        return ProviderRateLimited(provider, f"rate limited (HTTP 429): {detail}", retry_after_s)
    if status >= 500:
        return ProviderUnavailable(provider, f"HTTP {status}: {detail}")
    if status in (401, 403):
        # Our key, not the caller's request: see ProviderAuthFailed.
        return ProviderAuthFailed(provider, status, detail)
    if 400 <= status < 500:
        return ProviderBadRequest(provider, f"HTTP {status}: {detail}")
    # 1xx/3xx (redirects are not followed): a proxy or a wrong URL in between.
    return ProviderUnavailable(provider, f"unexpected HTTP {status}: {detail}")


def error_detail(body: bytes, secrets: Iterable[str] = ()) -> str:
    """The backend's own error message when it sent one, else the start of the body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return excerpt(body.decode("utf-8", "replace"), secrets)
    message = error_message(data)
    return excerpt(message if message is not None else body.decode("utf-8", "replace"), secrets)


def error_message(data: Any) -> str | None:
    """`{"error": "..."}` (Ollama) or `{"error": {"message": "..."}}` (OpenAI)."""
    if not isinstance(data, dict) or "error" not in data:
        return None
    error = data["error"]
    if isinstance(error, dict):
        message = error.get("message")
        return str(message) if message is not None else str(error)
    return str(error)


def excerpt(text: str, secrets: Iterable[str] = (), limit: int = EXCERPT_CHARS) -> str:
    """A one-line, bounded piece of a body: enough to debug, never a whole HTML page.

    Secrets are blanked first: some proxies echo the key they rejected.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    if len(text) > limit:
        return text[: limit - 1] + "…"
    return text or "(empty body)"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now; it may be a number or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def parse_json(provider: str, body: bytes | str, secrets: Iterable[str] = ()) -> Any:
    """Parse a 2xx body; anything that is not JSON means the backend broke its protocol."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body if isinstance(body, str) else body.decode("utf-8", "replace")
        raise ProviderBadOutput(provider, f"not JSON: {excerpt(text, secrets)}") from None


def bad_shape(
    provider: str, what: str, data: Any, secrets: Iterable[str] = ()
) -> ProviderBadOutput:
    """The error for JSON that does not have the protocol's shape."""
    shown = orjson.dumps(data).decode("utf-8", "replace") if data is not None else "null"
    return ProviderBadOutput(provider, f"{what}: {excerpt(shown, secrets)}")


def as_int(value: Any) -> int:
    """Token counts: a missing or odd value counts as 0 rather than failing a good reply."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))
