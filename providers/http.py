"""HTTP plumbing shared by the Ollama and OpenAI-compatible providers.

Both providers must turn the same transport failures into the same typed
errors, or the retry layer would treat Ollama and WaddleAI differently for the
same outage. Everything that decides "retry or dead letter" for an HTTP answer
lives here, once.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from providers.errors import (
    ProviderBadOutput,
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)

# Sized for hundreds of replies in flight at once: a smaller pool would queue
# requests inside httpx, where the wait counts against the provider's timeout.
POOL_LIMITS = httpx.Limits(
    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=30.0
)

EXCERPT_CHARS = 200


def build_client(
    base_url: str,
    timeout_s: float,
    *,
    verify: bool | str = True,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """One pooled client per provider; connecting gets a short budget of its own.

    A backend that is down should fail in seconds (so a fallback can answer),
    while a slow generation may use the whole timeout.
    """
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
        limits=POOL_LIMITS,
        verify=ssl_verify(verify),
        headers=headers,
    )


def ssl_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """A CA path becomes an SSL context: httpx deprecated `verify=<path>`."""
    if isinstance(verify, bool):
        return verify
    try:
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"CA certificate {verify!r} cannot be used: {exc}") from exc


@contextmanager
def transport_errors(provider: str) -> Iterator[None]:
    """Map httpx's transport failures to the provider errors the retry layer knows."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(provider, f"timed out ({type(exc).__name__})") from exc
    except httpx.RequestError as exc:
        # ConnectError, RemoteProtocolError, ReadError...: the backend may be
        # back on the next attempt. str(exc) carries no header, so no API key.
        detail = str(exc) or type(exc).__name__
        raise ProviderUnavailable(provider, f"{type(exc).__name__}: {detail}") from exc


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
    if 400 <= status < 500:
        return ProviderBadRequest(provider, f"HTTP {status}: {detail}")
    # 1xx/3xx (redirects are not followed): a proxy or a wrong URL in between.
    return ProviderUnavailable(provider, f"unexpected HTTP {status}: {detail}")


def raise_for_status(provider: str, response: httpx.Response, secrets: Iterable[str] = ()) -> None:
    """Raise the typed error for a non-2xx answer; the body must have been read."""
    if response.is_success:
        return
    detail = error_detail(response.content, secrets)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    raise error_for_status(provider, response.status_code, detail, retry_after_s=retry_after)


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
