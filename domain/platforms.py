"""How long a chat message may be on each platform.

A leaf: the prompt tells the model the limit and the safety step cuts to it,
from this one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from schemas.events import Platform

PLATFORM_LIMITS: Mapping[Platform, int] = MappingProxyType(
    {
        Platform.TWITCH: 500,
        Platform.KICK: 500,
        Platform.YOUTUBE: 200,
        Platform.DISCORD: 2000,
        Platform.SLACK: 4000,
    }
)


def reply_limit(platform: Platform, max_chars: int | None = None) -> int:
    """The smaller of the platform's limit and the community's own."""
    limit = PLATFORM_LIMITS[platform]
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        limit = min(limit, max_chars)
    return limit
