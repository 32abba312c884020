"""What the worker remembers between events, behind one interface.

Three kinds of state decide and shape a reply: the reply marker (was this
event answered already?), the cooldowns (was this user or channel answered a
moment ago?) and the conversation (the last turns). They are read together in
`admit()`, one round trip to Redis per event, and written together in
`record()` after the reply is confirmed: the pipeline never pays three trips
where one will do.

Cooldowns are *owned* by the event that claimed them (the value is its
`event_id`): a retried event finds its own claim and goes on, a different event
finds someone else's and is refused. The in-flight lease is owned by one
handling attempt, so two copies of one event are told apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from domain.conversation import ConversationKey, Turn


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    event_id: str
    # Unique per handling of a delivery: owns the in-flight lease, so a second
    # copy of the same event (same event_id) is still told apart from us.
    attempt_id: str
    key: ConversationKey
    # 0 means this event has no such cooldown: it is neither checked nor claimed.
    user_cooldown_ms: int
    channel_cooldown_ms: int
    # While an event is in flight, a copy of it delivered elsewhere must not call
    # the provider too; the lease ends on its own after this long.
    lease_ms: int
    history_turns: int

    def __post_init__(self) -> None:
        # Redis rejects PX 0 and reads LRANGE -0 -1 as "everything": refuse
        # here, once for every store, so a request valid for one is valid for all.
        if self.lease_ms <= 0:
            raise ValueError(f"lease_ms must be positive, got {self.lease_ms}")
        if self.user_cooldown_ms < 0 or self.channel_cooldown_ms < 0:
            raise ValueError("cooldowns must not be negative")
        if self.history_turns < 0:
            raise ValueError(f"history_turns must not be negative, got {self.history_turns}")


class Verdict(StrEnum):
    ADMITTED = "admitted"
    ALREADY_ANSWERED = "already_answered"
    IN_FLIGHT_ELSEWHERE = "in_flight_elsewhere"
    USER_COOLDOWN = "user_cooldown"
    CHANNEL_COOLDOWN = "channel_cooldown"
    # An earlier attempt stashed its reply and died before recording it: the
    # same reply is to be published again (same message_id), not a new one.
    REPLY_PENDING = "reply_pending"


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    history: list[Turn] = field(default_factory=list)
    # With REPLY_PENDING: the reply the earlier attempt was publishing.
    pending_reply: bytes | None = None
    # With IN_FLIGHT_ELSEWHERE: how long the other attempt's lease still runs
    # (None: unknown). A copy deferred for less only comes back to be deferred again.
    lease_left_ms: int | None = None
    # With USER_COOLDOWN / CHANNEL_COOLDOWN: how long the cooldown still runs
    # (None: unknown), so "why no reply?" can say when the next one may come.
    cooldown_left_ms: int | None = None

    @property
    def admitted(self) -> bool:
        return self.verdict is Verdict.ADMITTED


@dataclass(frozen=True, slots=True)
class RecordRequest:
    event_id: str
    # The attempt that admitted the event: its lease is dropped only if it still
    # holds it, so a late record cannot free a lease another attempt took over.
    attempt_id: str
    key: ConversationKey
    turns: list[Turn]
    # Counted in entries, not exchanges: a user message and its reply are two.
    history_turns: int
    history_ttl_s: int
    dedupe_ttl_s: int

    def __post_init__(self) -> None:
        # EXPIRE 0 would delete the history it was meant to keep.
        if self.dedupe_ttl_s <= 0 or self.history_ttl_s <= 0:
            raise ValueError("dedupe_ttl_s and history_ttl_s must be positive")
        if self.history_turns < 0:
            raise ValueError(f"history_turns must not be negative, got {self.history_turns}")


class StateStore(Protocol):
    """Conversation memory, cooldowns and reply markers (Redis or process memory)."""

    @property
    def backend(self) -> str:
        """`redis` or `memory`, for /readyz and logs."""
        ...

    async def admit(self, request: AdmitRequest) -> Admission:
        """Check the marker and cooldowns, claim them, and read the history, atomically."""
        ...

    async def stash_reply(
        self, event_id: str, attempt_id: str, reply: bytes, ttl_ms: int
    ) -> bool:
        """Keep the reply about to be published (the outbox); False if the lease is lost.

        A worker that dies between the broker's confirm and `record()` leaves
        the reply here; the event's next attempt finds it in `admit()` and
        publishes the very same reply again instead of asking for a new one.
        """
        ...

    async def renew_lease(self, event_id: str, attempt_id: str, lease_ms: int) -> bool:
        """Extend this attempt's in-flight lease to `lease_ms` from now; False if it is lost.

        An attempt still generating renews its lease, so a slow generation is
        never taken for a dead worker's: no copy of the event is admitted and
        generated a second time while the first is still at it.
        """
        ...

    async def record(self, request: RecordRequest) -> None:
        """After a confirmed reply: set the marker, append the turns, drop lease and outbox."""
        ...

    async def release(
        self, event_id: str, attempt_id: str, *, cooldowns: ConversationKey | None = None
    ) -> None:
        """Drop this attempt's in-flight lease (its reply will not be sent by it).

        With `cooldowns`, also give back the user and channel cooldowns this
        event claimed in that conversation: the event will never be answered
        (rate-limited, or failed for good), so it must not silence the viewer
        or the channel. A cooldown another event holds is left alone.
        """
        ...

    async def was_answered(self, event_id: str) -> bool: ...

    async def put_outcome(self, event_id: str, outcome: bytes, ttl_s: int) -> None:
        """Keep what became of an event (no message text) for `ttl_s`, for `explain`."""
        ...

    async def get_outcome(self, event_id: str) -> bytes | None:
        """The outcome `put_outcome` kept, or None (unknown, or expired)."""
        ...

    async def ping(self) -> None:
        """Return when the backend answers; raise when it does not."""
        ...

    async def aclose(self) -> None: ...
