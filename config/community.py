"""Per-community behaviour: persona, triggers, cooldowns, provider and output limits.

The profile itself (a plain value) is `domain.community.CommunityProfile`;
this module builds it. The pipeline asks a `CommunityConfigSource` for the profile of each event's
community and never reads settings itself. Without a database every community
gets the environment defaults (`EnvCommunityConfig`); with one,
`config.service.DatabaseCommunityConfig` merges each community's row over
those same defaults behind the same interface.

Every field added after the first release has a default equal to "what the
environment alone would do", so code that builds a profile by hand keeps
working and a community without its own row behaves as before.
"""

from __future__ import annotations

from typing import Protocol

from config.settings import Settings
from domain.community import CommunityProfile
from domain.persona import Persona
from domain.triggers import TriggerRules


def persona_from_settings(settings: Settings) -> Persona:
    """The environment's persona: what every community gets without its own row."""
    return Persona(bot_name=settings.bot_name, system_prompt=settings.system_prompt)


def trigger_rules_from_settings(settings: Settings) -> TriggerRules:
    """The environment's trigger rules: what every community gets without its own row."""
    return TriggerRules(bot_name=settings.bot_name, known_bots=frozenset(settings.known_bots))


class CommunityConfigSource(Protocol):
    async def profile(self, community_id: str) -> CommunityProfile: ...


class EnvCommunityConfig:
    """Every community gets the environment's defaults (no database configured)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._persona = persona_from_settings(settings)
        self._rules = trigger_rules_from_settings(settings)

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
