from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import pytest

from consumers.proactive import (
    ProactiveDecider,
    proactive_limit_check,
    proactive_rate_key,
)
from context.rate_limits import LimitCheck, MemoryRateLimiter
from domain.triggers import TriggerDecision, TriggerRules, detect_trigger
from schemas.events import InteractionEvent, MessageType, Platform
from schemas.replies import Trigger

RULES = TriggerRules(bot_name="waddlebot", known_bots=frozenset({"nightbot"}))
CHATTER = "that boss fight was wild, the second phase especially"


def make_event(
    content: str = CHATTER,
    *,
    message_type: MessageType = MessageType.CHAT_MESSAGE,
    username: str = "alice",
    metadata: dict[str, Any] | None = None,
    community_id: str = "c1",
) -> InteractionEvent:
    return InteractionEvent(
        event_id="e1",
        community_id=community_id,
        platform=Platform.TWITCH,
        channel_id="ch1",
        user_id="u1",
        username=username,
        display_name=None,
        message_type=message_type,
        message_content=content,
        metadata=metadata or {},
    )


def wants(
    decider: ProactiveDecider,
    event: InteractionEvent,
    *,
    enabled: bool = True,
    probability: float = 1.0,
    min_length: int = 10,
) -> bool:
    """Like the pipeline: the decision is detect_trigger's for this very event."""
    return decider.wants_to_chat(
        event,
        detect_trigger(event, RULES),
        enabled=enabled,
        probability=probability,
        min_length=min_length,
    )


def test_plain_chatter_is_eligible() -> None:
    event = make_event()
    assert detect_trigger(event, RULES).skip_reason == "no_trigger"
    assert wants(ProactiveDecider(random.Random(1)), event)


def test_probability_zero_never_chats() -> None:
    decider = ProactiveDecider(random.Random(1))
    assert not any(wants(decider, make_event(), probability=0.0) for _ in range(1000))


def test_probability_one_always_chats() -> None:
    decider = ProactiveDecider(random.Random(1))
    assert all(wants(decider, make_event(), probability=1.0) for _ in range(1000))


def test_disabled_never_chats() -> None:
    assert not wants(ProactiveDecider(random.Random(1)), make_event(), enabled=False)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_rate_is_close_to_the_probability(p: float) -> None:
    n = 10_000
    decider = ProactiveDecider(random.Random(12345))
    hits = sum(wants(decider, make_event(), probability=p) for _ in range(n))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= 3 * sigma


def test_a_seeded_rng_gives_the_same_answers() -> None:
    def run(seed: int) -> list[bool]:
        decider = ProactiveDecider(random.Random(seed))
        return [wants(decider, make_event(), probability=0.3) for _ in range(200)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_ineligible_lines_do_not_use_up_the_rng() -> None:
    """Only eligible lines flip the coin, so a test's answers do not shift with chat noise."""
    plain, noisy = ProactiveDecider(random.Random(3)), ProactiveDecider(random.Random(3))
    answers_plain = [wants(plain, make_event(), probability=0.5) for _ in range(50)]
    answers_noisy = []
    for _ in range(50):
        assert not wants(noisy, make_event("lol"), probability=0.5)
        answers_noisy.append(wants(noisy, make_event(), probability=0.5))
    assert answers_plain == answers_noisy


@pytest.mark.parametrize(
    ("content", "min_length", "expected"),
    [
        ("abcdefghij", 10, True),
        ("abcdefghi", 10, False),
        ("   abcdefghi   ", 10, False),  # whitespace does not count
        ("  abcdefghij\n", 10, True),
        ("lol", 0, True),
        ("lol", 3, True),
        ("lol", 4, False),
    ],
)
def test_min_length(content: str, min_length: int, expected: bool) -> None:
    event = make_event(content)
    assert wants(ProactiveDecider(random.Random(1)), event, min_length=min_length) is expected


@pytest.mark.parametrize(
    "content",
    [
        "hey everyone, how is the stream going tonight",  # greeting
        "waddlebot what do you think about the second phase",  # mention
        "has anyone beaten the second phase yet?",  # question
        "alright I am off to bed now, bye everyone",  # farewell
    ],
)
def test_triggered_lines_never_chat_proactively(content: str) -> None:
    event = make_event(content)
    assert detect_trigger(event, RULES).answer
    assert not wants(ProactiveDecider(random.Random(1)), event, min_length=0)


def test_a_switched_off_trigger_is_not_answered_proactively_either() -> None:
    rules = TriggerRules(bot_name="waddlebot", enabled_triggers=frozenset({Trigger.MENTION}))
    event = make_event("has anyone beaten the second phase yet?")
    decision = detect_trigger(event, rules)
    assert decision.skip_reason == "trigger_disabled"
    decider = ProactiveDecider(random.Random(1))
    assert not decider.wants_to_chat(event, decision, enabled=True, probability=1.0, min_length=0)


@pytest.mark.parametrize(
    "message_type", [t for t in MessageType if t is not MessageType.CHAT_MESSAGE]
)
def test_events_never_chat_proactively(message_type: MessageType) -> None:
    event = make_event(message_type=message_type)
    decider = ProactiveDecider(random.Random(1))
    assert not wants(decider, event, min_length=0)
    # Even with a decision that says otherwise (made for some other line).
    no_trigger = TriggerDecision.skip("no_trigger")
    assert not decider.wants_to_chat(
        event, no_trigger, enabled=True, probability=1.0, min_length=0
    )


@pytest.mark.parametrize(
    "event",
    [
        make_event(username="nightbot"),  # a known bot
        make_event(metadata={"is_bot": "true"}),  # flagged by the router
        make_event(username="waddlebot"),  # ourselves
        make_event(metadata={"is_self": True}),
        make_event("!uptime for this long stream please"),  # a command for another bot
        make_event("   "),  # nothing at all
    ],
)
def test_bots_commands_and_empty_lines_never_chat(event: InteractionEvent) -> None:
    assert detect_trigger(event, RULES).skip_reason != "no_trigger"
    assert not wants(ProactiveDecider(random.Random(1)), event, min_length=0)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_probability_out_of_range_is_rejected(p: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        wants(ProactiveDecider(random.Random(1)), make_event(), probability=p)


def test_negative_min_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_length"):
        wants(ProactiveDecider(random.Random(1)), make_event(), min_length=-1)


def test_default_rng_works() -> None:
    assert wants(ProactiveDecider(), make_event(), probability=1.0)


# --- from a community's policy ---------------------------------------------------


@dataclass(frozen=True)
class Rate:
    limit: int
    window_s: float


@dataclass(frozen=True)
class Policy:
    enabled: bool = True
    probability: float = 1.0
    min_length: int = 10
    rate_limit: Rate | None = None


def test_policy_shortcut() -> None:
    event = make_event()
    decision = detect_trigger(event, RULES)
    decider = ProactiveDecider(random.Random(1))
    assert decider.wants_to_chat_per(event, decision, Policy())
    assert not decider.wants_to_chat_per(event, decision, Policy(enabled=False))
    assert not decider.wants_to_chat_per(event, decision, Policy(min_length=1000))
    assert not decider.wants_to_chat_per(event, decision, None)


def test_limit_check_is_one_budget_per_community() -> None:
    policy = Policy(rate_limit=Rate(limit=2, window_s=600))
    check = proactive_limit_check(make_event(), policy)
    assert check == LimitCheck("proactive:c1", 2, 600_000)
    assert proactive_rate_key(make_event(community_id="guild:9")) == "proactive:guild%3A9"
    assert proactive_limit_check(make_event(), Policy()) is None


async def test_rate_limit_bounds_proactive_chatter() -> None:
    """The caller's part: the coin first, then the community's proactive budget."""
    decider = ProactiveDecider(random.Random(1))
    limiter = MemoryRateLimiter()
    policy = Policy(probability=1.0, rate_limit=Rate(limit=2, window_s=600))
    chatted = 0
    for t in range(10):
        event = make_event()
        if not decider.wants_to_chat_per(event, detect_trigger(event, RULES), policy):
            continue
        check = proactive_limit_check(event, policy)
        assert check is not None
        if (await limiter.hit_all([check], now_ms=t)).allowed:
            chatted += 1
    assert chatted == 2
