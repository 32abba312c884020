"""One conversation's identity and its remembered turns.

A leaf: the state stores keep turns, the prompt builder reads them and the
database may persist them, so the shape lives below all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    content: str
    # For user turns: the display name of who said it (prompts address people by name).
    speaker: str | None = None


@dataclass(frozen=True, slots=True)
class ConversationKey:
    community_id: str
    channel_id: str
    user_id: str
    platform: str
