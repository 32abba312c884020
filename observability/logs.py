"""Structured logs in the AAA shape: one JSON object a line (or text for a terminal).

Every line has `timestamp`, `level`, `module`, `action`, `message`, and,
where they apply, `user`, `community`, `result`, `execution_time` (ms),
`event_id` and `traceparent`. `level` is the category an operator filters on:
`audit` (who changed what), `system` (lifecycle, breakers, reconnects),
`error`, `info`, `debug`; `severity` keeps Python's level name.

Privacy is enforced here, not at every call site: a `user` or `user_id`
field is replaced by a keyed hash (HMAC-SHA256), so logs can follow one viewer
through a session without holding their platform id, and viewers' message
text is never passed to the logger at all.

Fields of the event being handled (event id, community, hashed user,
traceparent) are bound once per event with `bind()` and appear on every line
logged while it is handled, from any module, through a context variable that
asyncio copies into each task.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}
_USER_FIELDS = ("user", "user_id")

_bound: ContextVar[Mapping[str, Any] | None] = ContextVar("waddle_log_context", default=None)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add `fields` to every log line written inside the block (this task only)."""
    current = _bound.get() or {}
    token = _bound.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _bound.reset(token)


class UserHasher:
    """A keyed hash of user ids: stable across replicas that share the key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_secret(cls, secret: str | None) -> UserHasher:
        # Without a configured key, hashes still hide ids but only match within
        # this process's lifetime.
        return cls(secret.encode() if secret else secrets.token_bytes(32))

    def __call__(self, user_id: object) -> str:
        digest = hmac.new(self._key, str(user_id).encode(), hashlib.sha256).hexdigest()
        return f"u_{digest[:16]}"


def _category(record: logging.LogRecord, fields: Mapping[str, Any]) -> str:
    explicit = fields.get("category")
    if isinstance(explicit, str):
        return explicit
    if record.levelno >= logging.ERROR:
        return "error"
    if record.levelno >= logging.WARNING:
        return "system"
    return "debug" if record.levelno < logging.INFO else "info"


class _Fields:
    """Collects a record's fields: bound context, then `extra`, users hashed."""

    def __init__(self, hasher: UserHasher) -> None:
        self._hasher = hasher

    def collect(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = dict(_bound.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                fields[key] = value
        for key in _USER_FIELDS:
            if key in fields and fields[key] is not None and not _is_hashed(fields[key]):
                fields["user"] = self._hasher(fields.pop(key))
        return fields


def _is_hashed(value: object) -> bool:
    return isinstance(value, str) and value.startswith("u_") and len(value) == 18


class JsonFormatter(logging.Formatter):
    def __init__(self, hasher: UserHasher) -> None:
        super().__init__()
        self._fields = _Fields(hasher)

    def format(self, record: logging.LogRecord) -> str:
        fields = self._fields.collect(record)
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": _category(record, fields),
            "severity": record.levelname.lower(),
            "module": record.name,
            "action": fields.pop("action", None),
            "message": record.getMessage(),
        }
        fields.pop("category", None)
        entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, hasher: UserHasher) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._fields = _Fields(hasher)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = self._fields.collect(record)
        return base + ("  " + " ".join(f"{k}={v}" for k, v in fields.items()) if fields else "")


def configure_logging(level: str, fmt: str, *, user_hash_key: str | None = None) -> None:
    hasher = UserHasher.from_secret(user_hash_key)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(hasher) if fmt == "json" else TextFormatter(hasher))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika and aiormq narrate every reconnect attempt at INFO.
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
