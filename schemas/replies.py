"""The reply the worker publishes to `ai.responses` (contract v1)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

import orjson
from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Platform


class Trigger(StrEnum):
    GREETING = "greeting"
    FAREWELL = "farewell"
    QUESTION = "question"
    MENTION = "mention"
    EVENT = "event"
    PROACTIVE = "proactive"


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Reply(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = 1
    event_id: str
    session_id: str
    community_id: str
    platform: Platform
    channel_id: str
    user_id: str
    response_action: str = "chat"
    response: str
    trigger: Trigger
    provider: str
    model: str
    usage: Usage = Field(default_factory=Usage)
    # This attempt only: from its delivery to the reply being ready.
    processing_time_ms: int = 0
    # Ours (optional): from the event's `sent_at`, else its first receipt by a
    # worker (`x-first-received-at`, carried across retries), to the reply. With
    # retries it is what the viewer waited; `processing_time_ms` is the last try.
    age_ms: int | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def routing_key(self) -> str:
        return f"{self.platform.value}.{self.community_id}"

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))
