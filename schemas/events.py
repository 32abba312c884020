"""The interaction event the router publishes to `ai.interaction` (contract v1).

Parsing is strict about what the contract fixes (lengths, enums, the schema
version) and lenient about what it leaves open: unknown top-level fields are
ignored so the router can add optional ones without breaking older workers.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from schemas.errors import WaddleError
from schemas.headers import ErrorType

Id = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class Platform(StrEnum):
    TWITCH = "twitch"
    DISCORD = "discord"
    SLACK = "slack"
    KICK = "kick"
    YOUTUBE = "youtube"


class MessageType(StrEnum):
    CHAT_MESSAGE = "chatMessage"
    SUBSCRIPTION = "subscription"
    RESUB = "resub"
    GIFT_SUBSCRIPTION = "gift_subscription"
    FOLLOW = "follow"
    DONATION = "donation"
    CHEER = "cheer"
    RAID = "raid"
    BOOST = "boost"
    MEMBER_JOIN = "member_join"


class InteractionEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)

    schema_version: int = Field(default=1, ge=1, le=1)
    event_id: Id
    session_id: Annotated[str, StringConstraints(max_length=255)] | None = None
    community_id: Id
    platform: Platform
    channel_id: Id
    user_id: Id
    username: Id
    display_name: Annotated[str, StringConstraints(max_length=255)] | None = None
    message_type: MessageType = MessageType.CHAT_MESSAGE
    message_content: Annotated[str, StringConstraints(max_length=10_000)] = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    sent_at: datetime | None = None

    @property
    def effective_session_id(self) -> str:
        return self.session_id or self.event_id

    @property
    def speaker(self) -> str:
        """The name a reply should address: the display name when the platform gave one."""
        return (self.display_name or self.username).strip() or self.username


class EventError(WaddleError, ValueError):
    """A body that can never become a valid event; `error_type` goes in `x-error-type`."""

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


MAX_BODY_BYTES = 256 * 1024


def parse_event(body: bytes) -> InteractionEvent:
    """Bytes from the broker to a validated event, or an `EventError` saying why not."""
    if len(body) > MAX_BODY_BYTES:
        raise EventError(
            ErrorType.INVALID_SCHEMA, f"body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(ErrorType.INVALID_JSON, f"body is not JSON (UTF-8): {exc}") from None
    if not isinstance(data, dict):
        raise EventError(
            ErrorType.INVALID_SCHEMA, f"body is a JSON {type(data).__name__}, not an object"
        )
    try:
        return InteractionEvent.model_validate(data)
    except ValidationError as exc:
        raise EventError(ErrorType.INVALID_SCHEMA, _describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
