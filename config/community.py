"""Per-community behaviour: persona, triggers, cooldowns, provider and output limits.

The pipeline asks a `CommunityConfigSource` for the profile of each event's
community and never reads settings itself. Today every community gets the
environment defaults (`EnvCommunityConfig`); the PostgreSQL-backed source
plugs in behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from config.settings import ProviderName, Settings
from consumers.triggers import TriggerRules
from context.prompts import Persona


@dataclass(frozen=True, slots=True)
class CommunityProfile:
    community_id: str
    enabled: bool
    persona: Persona
    trigger_rules: TriggerRules
    provider: ProviderName
    fallback_providers: tuple[ProviderName, ...]
    model: str | None
    temperature: float
    max_tokens: int
    response_prefix: str
    user_cooldown_ms: int
    channel_cooldown_ms: int
    history_turns: int
    max_reply_chars: int | None
    allow_links: bool


class CommunityConfigSource(Protocol):
    async def profile(self, community_id: str) -> CommunityProfile: ...


class EnvCommunityConfig:
    """Every community gets the environment's defaults (no database configured)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._persona = Persona.from_settings(settings)
        self._rules = TriggerRules.from_settings(settings)

    async def profile(self, community_id: str) -> CommunityProfile:
        s = self._settings
        return CommunityProfile(
            community_id=community_id,
            enabled=True,
            persona=self._persona,
            trigger_rules=self._rules,
            provider=s.ai_provider,
            fallback_providers=tuple(s.ai_fallback_providers),
            model=None,
            temperature=s.ai_temperature,
            max_tokens=s.ai_max_tokens,
            response_prefix=s.response_prefix,
            user_cooldown_ms=int(s.user_cooldown_s * 1000),
            channel_cooldown_ms=int(s.channel_cooldown_s * 1000),
            history_turns=s.history_turns,
            max_reply_chars=None,
            allow_links=True,
        )
