"""The life of one valid event: decide, remember, ask, clean, reply.

The pipeline returns an `Outcome` and never touches the delivery itself; the
consumer turns the outcome into broker actions (ack, retry copy, dead
letter). That keeps the order the contract needs in one place: whatever the
outcome, the event is acked only after what it produced is confirmed.

`handle` is a list of steps. First the guards (`_guards`): small decisions
on the event and its community's profile, each returning None to go on or
the no-reply outcome that ends it (disabled community, stale, no trigger,
blocked word). Then admission by the state store (duplicate, copy in flight,
cooldowns). What follows runs under the attempt's lease, one `async with`
(`_lease`) that renews it while inside and releases it on every exit that
is not a reply: the rate limits, then the answer (prompt, provider, safety,
stash, publish). A reply is then remembered. To add a guard, write a method
`(Handling) -> Outcome | None` and put it in `_guards` where it belongs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from config.community import CommunityConfigSource
from consumers.outcomes import cooldown_detail, stale_detail
from consumers.proactive import ProactiveDecider, proactive_limit_check
from context.lease import LeaseKeeper
from context.prompts import build_messages
from context.rate_limits import (
    LimitCheck,
    MemoryRateLimiter,
    RateLimiter,
    check_limits,
    community_rate_key,
    user_rate_key,
)
from context.store import Admission, AdmitRequest, RecordRequest, StateStore, Verdict
from domain.community import CommunityProfile
from domain.conversation import ConversationKey, Turn
from domain.platforms import reply_limit
from domain.triggers import detect_trigger
from observability.metrics import Metrics
from providers.base import ChatRequest
from providers.breaker import CircuitOpen
from providers.errors import ProviderError, ProviderRateLimited
from providers.router import ProviderRouter
from publishers.confirm import PublishFailed, Unroutable
from publishers.failures import Failure
from publishers.replies import ReplyPublisher
from publishers.safety import contains_blocked_word, make_safe
from schemas.events import InteractionEvent
from schemas.headers import ErrorType
from schemas.replies import Reply, Trigger, Usage

log = logging.getLogger(__name__)

MAX_REMEMBERED_CHARS = 1000


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the pipeline needs to know about the delivery, not the event."""

    attempt_id: str
    first_received_at: datetime
    traceparent: str | None = None
    # Replayed from the DLQ by an operator: its age counts from the replay.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Replied:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Skipped:
    """Acked with no reply; `reason` labels the no-reply metric.

    `detail`: the why in numbers when there are some (a cooldown's time left,
    an event's age), for `waddle-ai explain`; else the reason's own sentence.
    """

    reason: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    failure: Failure
    retryable: bool
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Deferred:
    """Not failed, not answered yet: look again later, without spending a retry.

    - `in_flight_elsewhere` (and `lease_lost`): another copy of this event is
      being answered. `after_ms` is how long the other attempt's lease still
      runs (None: unknown). Either that attempt answers meanwhile, and this
      copy is then skipped as already answered, or it died, and this copy
      takes over once its lease expires; coming back much sooner only defers
      it again.
    - `circuit_open`: every provider of the chain refused it without a
      request, because their circuits are open. Nothing failed, so no retry
      is spent; `after_ms` is when the first circuit may close (its next
      health probe). `MAX_EVENT_AGE_S` bounds the wait, as for any event.

    `detail` says why, for the log and the copy's `x-error` header.
    """

    reason: ErrorType
    after_ms: int | None = None
    detail: str | None = None


Outcome = Replied | Skipped | Failed | Deferred


class ContextArchive(Protocol):
    """Where a community that opted in keeps its turns (PostgreSQL)."""

    async def append_turns(self, key: ConversationKey, turns: Sequence[Turn]) -> int: ...


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    max_event_age_s: float
    lease_ms: int
    history_ttl_s: int
    dedupe_ttl_s: int


def reply_token_budget(max_tokens: int, reply_chars: int) -> int:
    """No more tokens than the platform can show (a token is ~3-4 characters).

    Tokens past the platform's limit would be cut by the safety filter anyway;
    not generating them makes every reply cheaper and faster.
    """
    return max(1, min(max_tokens, reply_chars // 3 + 16))


def _publish_failure(exc: PublishFailed) -> Failure:
    """Unroutable has its own type: "nobody listens" is not "the broker is down".

    Both are retried: a router that is restarting binds again within the
    delays; one that does not leaves the reply in the DLQ as `unroutable`,
    ready for `dlq replay --error-type unroutable` once it runs.
    """
    if isinstance(exc, Unroutable):
        return Failure(ErrorType.UNROUTABLE,
                       f"{exc}; is the router running and bound to {exc.exchange}?")
    return Failure(ErrorType.PUBLISH_FAILED, str(exc))


def _age_ms(event: InteractionEvent, delivery: Delivery) -> int:
    """What the viewer waited: from `sent_at` (else the first receipt) to now.

    Across retries `processing_time_ms` counts only the last attempt; this is
    the whole wait. Never negative: a router's clock may run ahead of ours.
    """
    since = event.sent_at or delivery.first_received_at
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return max(0, int((datetime.now(UTC) - since).total_seconds() * 1000))


@dataclass(slots=True)
class Handling:
    """One event on its way through the steps, and what the steps found out so far."""

    event: InteractionEvent
    delivery: Delivery
    profile: CommunityProfile
    started: float
    # Set by the trigger guard: why the bot answers (None until then).
    trigger: Trigger | None = None

    @property
    def key(self) -> ConversationKey:
        event = self.event
        return ConversationKey(
            community_id=event.community_id, channel_id=event.channel_id,
            user_id=event.user_id, platform=event.platform.value,
        )


# A guard: None to go on, or the no-reply outcome that ends the handling.
Guard = Callable[[Handling], Outcome | None]


@dataclass(slots=True)
class _Held:
    """The outcome of what ran under the lease; a reply keeps the lease, nothing else does."""

    outcome: Outcome | None = None


def _gives_back_cooldowns(outcome: Outcome | None) -> bool:
    """Nothing was said and nothing will be: the viewer and channel are not cooled down.

    A refusal after admission (a rate limit) and a failure that is not retried
    give their cooldowns back; a retry or a deferral keeps them, since the
    event still owns them and comes back.
    """
    return isinstance(outcome, Skipped) or (
        isinstance(outcome, Failed) and not outcome.retryable)


class InteractionPipeline:
    def __init__(
        self,
        *,
        config: CommunityConfigSource,
        store: StateStore,
        providers: ProviderRouter,
        replies: ReplyPublisher,
        metrics: Metrics,
        options: PipelineOptions,
        rate_limiter: RateLimiter | None = None,
        proactive: ProactiveDecider | None = None,
        archive: ContextArchive | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._providers = providers
        self._replies = replies
        self._metrics = metrics
        self._options = options
        # Without a limiter of its own, limits are counted in this process.
        self._limits: RateLimiter = rate_limiter or MemoryRateLimiter()
        self._proactive = proactive or ProactiveDecider()
        self._archive = archive

        # The guards, in order: cheap decisions on the event and its profile
        # alone, before any state is touched. The first to refuse ends it.
        self._guards: tuple[Guard, ...] = tuple(
            guard.__get__(self) for guard in self._guard_order())  # bound once, not per event

    @classmethod
    def _guard_order(cls) -> tuple[Callable[[InteractionPipeline, Handling], Outcome | None], ...]:
        """The guards, first to last: where a new one is put in."""
        return (cls._community_enabled, cls._fresh, cls._triggered, cls._not_blocked)

    async def handle(self, event: InteractionEvent, delivery: Delivery) -> Outcome:
        """Guards, admission, then under the lease: the limits, the answer, the reply."""
        started = time.perf_counter()
        profile = await self._config.profile(event.community_id)
        h = Handling(event, delivery, profile, started)
        for guard in self._guards:
            refused = guard(h)
            if refused is not None:
                return refused
        trigger = h.trigger
        assert trigger is not None  # the trigger guard went on, so it set one
        admission = await self._store.admit(AdmitRequest(
            event_id=event.event_id,
            attempt_id=delivery.attempt_id,
            key=h.key,
            user_cooldown_ms=profile.user_cooldown_ms,
            # Someone talking to the bot by name is answered even when the
            # channel is busy; their own cooldown still applies.
            channel_cooldown_ms=0 if trigger is Trigger.MENTION else profile.channel_cooldown_ms,
            lease_ms=self._options.lease_ms,
            history_turns=profile.history_turns,
        ))
        refused = self._not_admitted(h, admission)
        if refused is not None:
            return refused
        pending = (admission.pending_reply
                   if admission.verdict is Verdict.REPLY_PENDING else None)
        async with self._lease(h) as held:
            if pending is not None:
                held.outcome = await self._republish(h, pending)
            else:
                # After admit: a duplicate, a copy in flight or a cooled-down
                # message never spends a viewer's or a community's budget.
                held.outcome = await self._within_limits(h) or await self._answer(
                    event, delivery, profile, trigger, admission.history, started)
        outcome = held.outcome
        if isinstance(outcome, Replied):
            await self._remember(event, delivery, h.key, profile, outcome.reply)
        return outcome

    # -- the guards (before admission) ---------------------------------------------

    def _community_enabled(self, h: Handling) -> Outcome | None:
        return None if h.profile.enabled else Skipped("community_disabled")

    def _fresh(self, h: Handling) -> Outcome | None:
        age_s = self._age_s(h.event, h.delivery)
        if age_s > self._options.max_event_age_s:
            return Skipped(ErrorType.STALE, stale_detail(age_s, self._options.max_event_age_s))
        return None

    def _triggered(self, h: Handling) -> Outcome | None:
        decision = detect_trigger(h.event, h.profile.trigger_rules)
        trigger = decision.trigger
        if trigger is None and self._proactive.wants_to_chat_per(
                h.event, decision, h.profile.proactive):
            trigger = Trigger.PROACTIVE
        if trigger is None:
            return Skipped(decision.skip_reason or "no_trigger")
        h.trigger = trigger
        return None

    def _not_blocked(self, h: Handling) -> Outcome | None:
        words = h.profile.blocked_words
        if words and contains_blocked_word(h.event.message_content, words):
            return Skipped("blocked_word")
        return None

    # -- admission and the lease -------------------------------------------------

    def _not_admitted(self, h: Handling, admission: Admission) -> Outcome | None:
        """The outcome of an admission that holds no lease; None when this attempt holds it."""
        if admission.verdict is Verdict.ALREADY_ANSWERED:
            self._metrics.dedupe_hits.inc()
            return Skipped("duplicate")
        if admission.verdict is Verdict.IN_FLIGHT_ELSEWHERE:
            return Deferred(ErrorType.IN_FLIGHT_ELSEWHERE, admission.lease_left_ms)
        if admission.verdict is Verdict.REPLY_PENDING and admission.pending_reply is not None:
            return None
        if not admission.admitted:
            reason = admission.verdict.value
            cooldown_ms = {Verdict.CHANNEL_COOLDOWN: h.profile.channel_cooldown_ms,
                           Verdict.USER_COOLDOWN: h.profile.user_cooldown_ms}.get(
                               admission.verdict)
            return Skipped(reason, None if cooldown_ms is None else cooldown_detail(
                reason, cooldown_ms, admission.cooldown_left_ms))
        return None

    @asynccontextmanager
    async def _lease(self, h: Handling) -> AsyncIterator[_Held]:
        """The in-flight lease this attempt was admitted with, for as long as it works.

        Renewed while inside (`LeaseKeeper`): a slow generation keeps its
        lease, so no copy of the event is generated a second time. Released
        on every exit that is not a reply (a reply's lease ends when it is
        recorded), here and only here.
        """
        held = _Held()
        try:
            async with LeaseKeeper(self._store, h.event.event_id, h.delivery.attempt_id,
                                   self._options.lease_ms, metrics=self._metrics):
                yield held
        finally:
            if not isinstance(held.outcome, Replied):
                await self._release(h, cooldowns=(
                    h.key if _gives_back_cooldowns(held.outcome) else None))

    async def _within_limits(self, h: Handling) -> Outcome | None:
        """None to go on, or the no-reply outcome of a rate limit that refuses the event."""
        assert h.trigger is not None
        limited = await self._rate_limited(h.event, h.trigger, h.profile)
        return None if limited is None else Skipped(limited)

    async def _answer(
        self, event: InteractionEvent, delivery: Delivery, profile: CommunityProfile,
        trigger: Trigger, history: list[Turn], started: float,
    ) -> Outcome:
        messages = build_messages(event, trigger, profile.persona, history)
        request = ChatRequest(
            messages=messages,
            temperature=profile.temperature,
            max_tokens=reply_token_budget(
                profile.max_tokens, reply_limit(event.platform, profile.max_reply_chars)),
            model=profile.model_for(trigger),
        )
        api_key = profile.provider_api_key.reveal() if profile.provider_api_key else None
        primary = self._providers.endpoint(profile.provider, profile.provider_base_url, api_key)
        chain = (primary, *profile.fallback_providers)
        try:
            completion = await self._providers.complete(chain, request)
        except CircuitOpen as exc:
            # Refused, not failed: no provider was asked. The event waits for
            # the first circuit to close, its retry budget untouched.
            after_ms = None if exc.retry_after_s is None else int(exc.retry_after_s * 1000)
            return Deferred(ErrorType.CIRCUIT_OPEN, after_ms, str(exc))
        except ProviderError as exc:
            # A provider's Retry-After: retrying sooner would only spend the
            # event's retry budget on another refusal.
            retry_after = exc.retry_after_s if isinstance(exc, ProviderRateLimited) else None
            return Failed(Failure(exc.error_type, str(exc)), exc.retryable, retry_after)

        text = make_safe(
            completion.text, event.platform, prefix=profile.response_prefix,
            max_chars=profile.max_reply_chars, allow_links=profile.allow_links,
            blocked_words=profile.blocked_words, prompt=messages[0].content,
            truncated=completion.truncated,
        )
        if not text:
            cut = (", cut by the token limit before a sentence ended"
                   if completion.truncated else "")
            return Failed(Failure(
                ErrorType.EMPTY_OUTPUT,
                f"{completion.provider} ({completion.model}) answered nothing usable "
                f"({len(completion.text)} characters before the safety filter{cut})",
            ), retryable=False)

        reply = Reply(
            event_id=event.event_id,
            session_id=event.effective_session_id,
            community_id=event.community_id,
            platform=event.platform,
            channel_id=event.channel_id,
            user_id=event.user_id,
            response=text,
            trigger=trigger,
            provider=completion.provider,
            model=completion.model,
            usage=Usage(
                prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens,
            ),
            processing_time_ms=int((time.perf_counter() - started) * 1000),
            age_ms=_age_ms(event, delivery),
        )
        # The outbox: should this worker die between the broker's confirm and
        # recording the reply, the next attempt publishes this same reply again.
        if not await self._store.stash_reply(
            event.event_id, delivery.attempt_id, reply.to_json(),
            ttl_ms=self._options.dedupe_ttl_s * 1000,
        ):
            return Deferred(ErrorType.LEASE_LOST)
        try:
            await self._replies.publish(reply, traceparent=delivery.traceparent)
        except PublishFailed as exc:
            return Failed(_publish_failure(exc), retryable=True)
        return Replied(reply)

    async def _republish(self, h: Handling, stashed: bytes) -> Outcome:
        """Publish the reply an earlier attempt stashed, byte for byte.

        That attempt may or may not have got it out before dying; either way
        the router sees the same body under the same message_id
        (`reply:<event_id>`), so a repeat is recognisable as one.
        """
        reply = Reply.model_validate_json(stashed)
        try:
            await self._replies.publish(reply, traceparent=h.delivery.traceparent)
        except PublishFailed as exc:
            return Failed(_publish_failure(exc), retryable=True)
        self._metrics.replies_republished.inc()
        return Replied(reply)

    async def _rate_limited(
        self, event: InteractionEvent, trigger: Trigger, profile: CommunityProfile
    ) -> str | None:
        """The no-reply reason when a rate limit refuses this event, else None.

        The user's, the community's (and for proactive chatter its own) limits
        are checked together and charged only if all allow, so a community at
        its limit does not use up its viewers' budgets.
        """
        checks = [
            LimitCheck.of(user_rate_key(event.community_id, event.platform.value,
                                        event.user_id), profile.user_rate_limit),
            LimitCheck.of(community_rate_key(event.community_id), profile.community_rate_limit),
        ]
        if trigger is Trigger.PROACTIVE and profile.proactive is not None:
            checks.append(proactive_limit_check(event, profile.proactive))
        decision = await check_limits(self._limits, checks, event_id=event.event_id)
        if decision is None or decision.allowed:
            return None
        scope = (decision.limited_by or "").split(":", 1)[0]
        return f"rate_limited_{scope}" if scope else "rate_limited"

    @staticmethod
    def _age_s(event: InteractionEvent, delivery: Delivery) -> float:
        """The age staleness counts: a replayed event's from the replay."""
        seen = delivery.first_received_at if delivery.replayed else (
            event.sent_at or delivery.first_received_at)
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        return (datetime.now(UTC) - seen).total_seconds()

    async def _release(
        self, h: Handling, *, cooldowns: ConversationKey | None = None,
    ) -> None:
        try:
            await self._store.release(h.event.event_id, h.delivery.attempt_id,
                                      cooldowns=cooldowns)
        except Exception:
            # The lease expires on its own; a failed release only delays a retry.
            self._metrics.state_errors.labels("release").inc()
            log.warning("could not release the in-flight lease", exc_info=True,
                        extra={"action": "release", "event_id": h.event.event_id})

    async def _remember(
        self, event: InteractionEvent, delivery: Delivery, key: ConversationKey,
        profile: CommunityProfile, reply: Reply,
    ) -> None:
        """Mark the event answered and keep the exchange as conversation history.

        The reply is already confirmed, so a failure here is logged, not
        raised: the event must be acked either way. What it costs is written
        in the README (a redelivery in this window could be answered twice).
        """
        said = event.message_content or f"[{event.message_type.value}]"
        answer = reply.response.removeprefix(profile.response_prefix)
        turns = [
            Turn("user", said[:MAX_REMEMBERED_CHARS], speaker=event.speaker),
            Turn("assistant", answer[:MAX_REMEMBERED_CHARS]),
        ]
        try:
            await self._store.record(RecordRequest(
                event_id=event.event_id,
                attempt_id=delivery.attempt_id,
                key=key,
                turns=turns,
                history_turns=profile.history_turns,
                history_ttl_s=self._options.history_ttl_s,
                dedupe_ttl_s=self._options.dedupe_ttl_s,
            ))
        except Exception:
            self._metrics.state_errors.labels("record").inc()
            log.error("reply sent but not recorded; a redelivery could repeat it",
                      exc_info=True, extra={"action": "record", "event_id": event.event_id})
        if profile.persist_context and self._archive is not None:
            try:
                await self._archive.append_turns(key, turns)
            except Exception:
                # The opt-in archive is a record, not the live context: never fail a reply.
                self._metrics.state_errors.labels("archive").inc()
                log.warning("could not archive the turns", exc_info=True,
                            extra={"action": "archive", "event_id": event.event_id})
