"""Who the bot is in one community: its name, its system prompt, its reply length.

A leaf: the community profile holds one and the prompt builder renders it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Persona:
    """Who the bot is in one community; the operator writes it, viewers never do."""

    bot_name: str
    system_prompt: str
    max_reply_chars: int | None = None

    def __post_init__(self) -> None:
        if self.max_reply_chars is not None and self.max_reply_chars < 1:
            raise ValueError("max_reply_chars must be at least 1 (or None for the platform's)")

    def render(self) -> str:
        """`str.replace`, not `str.format`: an operator's prompt may contain other braces."""
        return self.system_prompt.replace("{bot_name}", self.bot_name).strip()
