"""One message of a conversation as a model reads it.

A leaf: the prompt builder writes these and every provider sends them, so the
type lives below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
