"""Whether the bot joins a conversation nobody asked it into.

A bot that only ever answers when called feels like a vending machine; one
that chimes in on every line is spam. So a community may let it speak up, by
chance, on ordinary chat lines: lines that `detect_trigger` looked at and
found nothing to answer (`no_trigger`). Everything `detect_trigger` refuses
for a reason (the bot itself, other bots, commands, empty lines, switched-off
triggers) stays refused, and events (subs, raids, ...) have their own trigger.

Short lines ("lol", "W", emotes) give a model nothing to say, hence
`min_length`. The coin is flipped only for eligible lines, so a seeded
`random.Random` gives the same answers for the same events in tests.

The chance alone does not bound the volume: a busy chat at 10% is still
several unprompted replies a minute. The caller bounds it with the shared
`RateLimiter`, scope `proactive`, one budget per community
(`proactive_limit_check`), and checks it only after the coin said yes, so
lines that lose the coin toss never spend it. Proactive replies then go
through the state store's cooldowns and dedupe like any other reply.
"""

from __future__ import annotations

import random

from context.rate_limits import SCOPE_PROACTIVE, LimitCheck, rate_key
from domain.community import ProactivePolicy
from domain.triggers import TriggerDecision
from schemas.events import InteractionEvent, MessageType


def proactive_rate_key(event: InteractionEvent) -> str:
    """One budget per community, shared by its channels and platforms."""
    return rate_key(SCOPE_PROACTIVE, event.community_id)


def proactive_limit_check(
    event: InteractionEvent, policy: ProactivePolicy
) -> LimitCheck | None:
    """The limit to hit once the coin said yes; None when the policy sets none."""
    return LimitCheck.of(proactive_rate_key(event), policy.rate_limit)


class ProactiveDecider:
    """Flips the coin for lines nobody asked the bot about; stateless apart from its rng."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def eligible(
        self, event: InteractionEvent, decision: TriggerDecision, *, min_length: int
    ) -> bool:
        """A plain chat line that matched nothing and is long enough to answer."""
        if min_length < 0:
            raise ValueError(f"min_length must not be negative, got {min_length}")
        # `no_trigger` is only reached after the own-message, bot, empty-line and
        # command checks, so those are excluded by it; the type is checked again so
        # a decision made for another event cannot let a raid through.
        return (
            decision.skip_reason == "no_trigger"
            and event.message_type is MessageType.CHAT_MESSAGE
            and len(event.message_content.strip()) >= min_length
        )

    def wants_to_chat(
        self,
        event: InteractionEvent,
        decision: TriggerDecision,
        *,
        enabled: bool,
        probability: float,
        min_length: int,
    ) -> bool:
        """`decision` is `detect_trigger`'s for this event, under the community's rules."""
        # Written so that NaN fails too.
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {probability}")
        if not enabled or not self.eligible(event, decision, min_length=min_length):
            return False
        if probability <= 0.0:
            return False
        if probability >= 1.0:
            return True
        return self._rng.random() < probability

    def wants_to_chat_per(
        self,
        event: InteractionEvent,
        decision: TriggerDecision,
        policy: ProactivePolicy | None,
    ) -> bool:
        """The same, straight from a community's policy; no policy means never."""
        if policy is None:
            return False
        return self.wants_to_chat(
            event,
            decision,
            enabled=policy.enabled,
            probability=policy.probability,
            min_length=policy.min_length,
        )


__all__ = [
    "ProactiveDecider",
    "proactive_limit_check",
    "proactive_rate_key",
]
