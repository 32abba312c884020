"""A failed command says, in one line, what failed and which setting to change.

A newcomer whose broker is not running should read "cannot reach RabbitMQ at
127.0.0.1:5672 (AMQP_URL): connection refused", not seventy lines of
aio-pika internals. `describe_failure` turns any exception that escapes a
command into that one line and an exit code: 2 when a setting is wrong (a
model path that is not a file), 1 when something failed (a service down, a
port in use). The traceback is still there for whoever needs it: with
`LOG_LEVEL=DEBUG` the CLI prints it after the line.

Which service failed is read from the exception itself: its type's module,
or the library code it was raised in (aiormq, redis, asyncpg, aiohttp), down
the chain of causes. That keeps the CLI's commands free of a try/except per
connection.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

from config.settings import Settings

EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2


@dataclass(frozen=True, slots=True)
class CommandFailure:
    message: str
    exit_code: int = EXIT_FAILED


# (what the frames' file paths or the exception's module contain) -> service
_LIBRARIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("aiormq", "aio_pika", "pamqp"), "rabbitmq"),
    (("redis",), "redis"),
    (("asyncpg",), "postgresql"),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _frames(tb: TracebackType | None) -> Iterator[str]:
    while tb is not None:
        yield tb.tb_frame.f_code.co_filename
        tb = tb.tb_next


def _service(exc: BaseException) -> str | None:
    for link in _chain(exc):
        module = type(link).__module__
        places = [module.replace(".", "/") + "/", *reversed(list(_frames(link.__traceback__)))]
        for place in places:
            for markers, service in _LIBRARIES:
                if any(f"{marker}/" in place for marker in markers):
                    return service
    return None


def _where(url: str | None, default_port: int) -> str:
    """host:port of a URL, never its credentials."""
    if not url:
        return "?"
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or '?'}:{parts.port or default_port}"
    except ValueError:
        return "(unparsable URL)"


def _reason(exc: BaseException) -> str:
    """The innermost cause's own words: "connection refused", not a wrapper's repr."""
    innermost = exc
    for link in _chain(exc):
        innermost = link
    for candidate in (innermost, exc):
        if isinstance(candidate, OSError) and candidate.strerror:
            return candidate.strerror.lower()
        text = str(candidate).strip()
        if text:
            return text.splitlines()[0][:200]
    return type(innermost).__name__


def describe_failure(exc: BaseException, settings: Settings) -> CommandFailure:
    """One line naming what failed and the setting to change, and the exit code."""
    from providers.local import LocalModelUnavailable

    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno == errno.EADDRINUSE:
            return CommandFailure(
                f"the sidecar cannot listen on {settings.sidecar_host}:{settings.sidecar_port}: "
                "address already in use (another worker on this machine?); set SIDECAR_PORT "
                "to a free port (0 picks one)")
        if isinstance(link, LocalModelUnavailable):
            if settings.local_model_path:
                named = "" if "LOCAL_MODEL_PATH" in str(link) else " (LOCAL_MODEL_PATH)"
                return CommandFailure(f"the local model cannot be loaded: {link}{named}",
                                      EXIT_BAD_SETTINGS)
            return CommandFailure(f"the local model cannot be loaded: {link} (AI_PROVIDER, "
                                  "AI_FALLBACK_PROVIDERS, LOCAL_MODEL_PATH)")
    service = _service(exc)
    reason = _reason(exc)
    if service == "rabbitmq":
        return CommandFailure(
            f"cannot reach RabbitMQ at {_where(settings.amqp_url, 5672)}: {reason}; "
            "is the broker running? (AMQP_URL)")
    if service == "redis":
        return CommandFailure(
            f"cannot reach Redis at {_where(settings.redis_url, 6379)}: {reason}; "
            "is it running? (REDIS_URL; unset it to keep state in process memory)")
    if service == "postgresql":
        return CommandFailure(
            f"cannot use PostgreSQL at {_where(settings.database_url, 5432)}: {reason}; "
            "is it running, and may this user connect? (DATABASE_URL)")
    return CommandFailure(
        f"{type(exc).__name__}: {reason} (LOG_LEVEL=DEBUG shows the traceback)")
