"""One dead letter as an operator sees it: who dead-lettered it, why, when, for which community.

Plain values read from a delivery's headers and body; no broker access here
(that is `worker.dlq.box`), so the reading can be tested on any message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import orjson
from aio_pika.abc import AbstractIncomingMessage

from publishers.failures import now_rfc3339, retry_count
from schemas import headers

PREVIEW_CHARS = 60

# Headers the broker sets on dead-lettering or delivery. A replay clears them
# with the retry headers, so the event comes back as the router first sent it.
_BROKER_HEADERS = ("x-delivery-count", "x-acquired-count")
_BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-")

_BROKER_REASONS = {
    "delivery_limit": "redelivered past the delivery limit of {queue}: workers took it and "
                      "never settled it (crashed, killed or cut off mid-event)",
    "rejected": "rejected without requeue by a consumer of {queue}",
    "expired": "expired in {queue} (message TTL)",
    "maxlen": "dropped by the length limit of {queue}",
}

Source = Literal["worker", "broker"]


# -- one letter ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as an operator needs to see it, detached from its delivery."""

    id: str
    body: bytes
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    source: Source
    error_type: str
    error: str
    retry_count: int
    failed_at: datetime | None
    community: str | None
    preview: str

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> DeadLetter:
        message_headers: Mapping[str, Any] = dict(message.headers or {})
        event = _json_object(message.body)
        source, error_type, error, failed_at = _failure(message_headers)
        community = event.get("community_id") if event else None
        content = event.get("message_content") if event else None
        return cls(
            id=letter_id(message.message_id, message.body),
            body=message.body,
            headers=message_headers,
            properties=_properties(message),
            source=source,
            error_type=error_type,
            error=error,
            retry_count=retry_count(message_headers),
            failed_at=failed_at or message.timestamp,
            community=community if isinstance(community, str) else None,
            preview=preview(content) if isinstance(content, str) else "",
        )

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.failed_at is None:
            return None
        failed_at = self.failed_at
        if failed_at.tzinfo is None:
            failed_at = failed_at.replace(tzinfo=UTC)
        return max(0.0, ((now or datetime.now(UTC)) - failed_at).total_seconds())

    def summary(self, now: datetime | None = None) -> dict[str, Any]:
        """The row of `dlq list --json`."""
        age = self.age_s(now)
        return {
            "id": self.id,
            "age_s": None if age is None else round(age, 3),
            "failed_at": iso(self.failed_at),
            "source": self.source,
            "error_type": self.error_type,
            "error": self.error,
            "retry_count": self.retry_count,
            "community": self.community,
            "preview": self.preview,
        }

    def detail(self, now: datetime | None = None) -> dict[str, Any]:
        """Everything about the letter, for `dlq show --json`."""
        body: Any
        event = json_value(self.body)
        if event is not NOT_JSON:
            body, encoding = event, "json"
        else:
            try:
                body, encoding = self.body.decode("utf-8"), "text"
            except UnicodeDecodeError:
                body, encoding = repr(self.body), "bytes-repr"
        return {
            **self.summary(now),
            "properties": jsonable(self.properties),
            "headers": jsonable(self.headers),
            "body": body,
            "body_encoding": encoding,
        }


def letter_id(message_id: str | None, body: bytes) -> str:
    """The router's message_id (the event_id), else a hash of the body, stable across reads."""
    if message_id:
        return message_id
    return hashlib.sha256(body).hexdigest()[:12]


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """One line of at most `limit` characters, safe to print on a terminal."""
    line = printable(" ".join(text.split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def replay_headers(original: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers of a replayed event: the failure and broker bookkeeping gone, the rest kept.

    `x-replayed-at` marks it replayed: an operator chose to have it answered,
    so its age counts from now, not from when the viewer wrote it.
    """
    kept = {
        key: value for key, value in (original or {}).items()
        if key not in headers.RETRY_HEADERS and key not in _BROKER_HEADERS
        and not key.startswith(_BROKER_HEADER_PREFIXES)
    }
    kept[headers.REPLAYED_AT] = now_rfc3339()
    return kept


def _failure(h: Mapping[str, Any]) -> tuple[Source, str, str, datetime | None]:
    """Who dead-lettered the letter, why, and when.

    Worker letters never carry `x-death` (the worker strips it), so `x-death`
    means the broker moved this letter itself; any `x-error` it still carries
    is from an earlier, retried attempt, and is shown as such.
    """
    deaths = h.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        death = deaths[0]
        reason = str(death.get("reason") or h.get("x-first-death-reason") or "unknown")
        queue = str(death.get("queue") or h.get("x-first-death-queue") or "its queue")
        text = _BROKER_REASONS.get(reason, reason + ": dead-lettered by the broker from {queue}")
        error = text.replace("{queue}", queue)  # not format(): headers are anyone's text
        count = death.get("count")
        if isinstance(count, int) and count > 1:
            error += f" ({count} times)"
        earlier = h.get(headers.ERROR)
        if earlier:
            error += f"; before that: {earlier}"
        when = death.get("time")
        return "broker", reason, error, when if isinstance(when, datetime) else None
    return (
        "worker",
        str(h.get(headers.ERROR_TYPE) or "unknown"),
        str(h.get(headers.ERROR) or ""),
        _parse_time(h.get(headers.LAST_FAILED_AT) or h.get(headers.FIRST_FAILED_AT)),
    )


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


NOT_JSON = object()


def json_value(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return NOT_JSON


def _json_object(body: bytes) -> dict[str, Any] | None:
    value = json_value(body)
    return value if isinstance(value, dict) else None


def _properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    names = ("message_id", "correlation_id", "content_type", "content_encoding",
             "delivery_mode", "priority", "reply_to", "timestamp", "type", "app_id", "user_id")
    values = {name: getattr(message, name, None) for name in names}
    return {name: value for name, value in values.items() if value not in (None, "")}


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    """AMQP field values (datetimes, bytes, decimals, nested tables) as JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


# Control characters and bidi overrides: a viewer's chat text must not be able
# to move an operator's cursor, recolour the terminal or reverse what they read.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    return _UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


# -- selecting and reporting ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """Which letters a replay takes.

    Each filter given must match (a letter matches a filter when it matches
    any of its values); no filter at all selects every letter.
    """

    ids: frozenset[str] = frozenset()
    error_types: frozenset[str] = frozenset()
    communities: frozenset[str] = frozenset()
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (not self.ids or letter.id in self.ids)
            and (not self.error_types or letter.error_type in self.error_types)
            and (not self.communities or letter.community in self.communities)
        )

    def full(self, taken: int) -> bool:
        return self.limit is not None and taken >= self.limit


@dataclass(slots=True)
class ReplayResult:
    dry_run: bool = False
    replayed: list[DeadLetter] = field(default_factory=list)  # or would be, on a dry run
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    examined: int = 0
    # Letters ready in the DLQ once the replay was done.
    left: int = 0


def sort_letters(letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    """Oldest failure first; letters without a time last, in the order read."""
    far_future = datetime.max.replace(tzinfo=UTC)

    def when(letter: DeadLetter) -> datetime:
        if letter.failed_at is None:
            return far_future
        return letter.failed_at if letter.failed_at.tzinfo else letter.failed_at.replace(
            tzinfo=UTC)

    return sorted(letters, key=when)
