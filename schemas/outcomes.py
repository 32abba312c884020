"""The shape of an event's recorded outcome, as `GET /outcomes/{event_id}` serves it.

`consumers.outcomes` writes the record; this model states what a reader (the
`explain` command, an operator's script, the OpenAPI document) may rely on.
Extra keys are allowed: a reply's outcome also names its trigger, provider
and `age_ms`, and later versions may add more.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

OutcomeStatus = Literal["replied", "no_reply", "retrying", "deferred", "dead_lettered", "requeued"]


class OutcomeRecord(BaseModel):
    """What became of one event. Never holds the viewer's text nor the reply's."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event_id: str
    status: OutcomeStatus
    reason: str
    detail: str
    final: bool
    at: datetime
    community_id: str | None = None
