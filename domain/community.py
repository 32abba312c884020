"""A community's profile: persona, triggers, provider, limits and proactive policy.

A leaf of plain values: the config layer builds profiles (from the environment
or the database), the pipeline reads them. Every field added after the first
release has a default equal to "what the environment alone would do", so code
that builds a profile by hand keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from domain.persona import Persona
from domain.provider_names import ProviderName
from domain.secret import Secret
from domain.triggers import TriggerRules
from schemas.replies import Trigger

# Used when a community switches proactive replies on without saying how often.
DEFAULT_PROACTIVE_PROBABILITY = 0.05
DEFAULT_PROACTIVE_MIN_LENGTH = 20


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `limit` replies per `window_s` seconds."""

    limit: int
    window_s: float

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("a rate limit allows at least 1 reply per window")
        if self.window_s <= 0:
            raise ValueError("a rate limit's window must be longer than 0 s")


@dataclass(frozen=True, slots=True)
class ProactivePolicy:
    """Whether, and how rarely, the bot joins a conversation nobody asked it into."""

    enabled: bool = False
    probability: float = DEFAULT_PROACTIVE_PROBABILITY
    min_length: int = DEFAULT_PROACTIVE_MIN_LENGTH
    rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("a proactive probability is between 0 and 1")
        if self.min_length < 0:
            raise ValueError("a proactive min_length is 0 or more characters")


def _no_models() -> Mapping[str, str]:
    return MappingProxyType({})


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
    # Where and as whom to reach the provider; None: the provider's environment settings.
    provider_base_url: str | None = None
    provider_api_key: Secret | None = None
    # Trigger value ("question", "event", ...) -> model; wins over `model`.
    # Left out of hash(): a mapping has none, and profiles were hashable before.
    model_by_trigger: Mapping[str, str] = field(default_factory=_no_models, hash=False)
    blocked_words: tuple[str, ...] = ()
    user_rate_limit: RateLimit | None = None
    community_rate_limit: RateLimit | None = None
    # None: the bot never joins a conversation unprompted.
    proactive: ProactivePolicy | None = None
    # Whether conversation turns may be written to PostgreSQL (off: Redis/memory only).
    persist_context: bool = False

    def model_for(self, trigger: Trigger | str) -> str | None:
        """The model for this trigger: its own if the community set one, else `model`."""
        key = trigger.value if isinstance(trigger, Trigger) else trigger
        return self.model_by_trigger.get(key) or self.model

    @property
    def proactive_enabled(self) -> bool:
        return self.proactive is not None and self.proactive.enabled
