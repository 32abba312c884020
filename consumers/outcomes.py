"""What became of each event, kept a while so anyone can ask "why no reply?".

"Why didn't the bot answer?" is every streamer's first question, and a silent
bot looks the same whatever the reason: no trigger, a cooldown, a bot's
message, a retry in progress, a dead letter. So the consumer hands every
settled delivery's fate to one step, `OutcomeRecorder`, which keeps it in the
state store (Redis, or process memory) for `OUTCOME_TTL_S` under the event id.
`waddle-ai publish --wait` and `waddle-ai explain EVENT_ID` read it back.

What is kept: the status, the reason (no-reply reason or error type), a
sentence of detail, the community, the trigger and provider of a reply, and
when. Never the viewer's text nor the reply's.

The write is one SET, made after the delivery is settled (acked, retried or
dead-lettered), in a background task: it adds nothing to an event's latency
and cannot touch the ack discipline. The tasks are bounded: past
`max_pending` writes in flight, the next one is awaited in place (back
pressure on a slow Redis) rather than dropped or piled up.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from context.store import StateStore
from schemas.headers import ErrorType

log = logging.getLogger(__name__)

REPLIED: Final = "replied"
NO_REPLY: Final = "no_reply"
RETRYING: Final = "retrying"
DEFERRED: Final = "deferred"
DEAD_LETTERED: Final = "dead_lettered"
REQUEUED: Final = "requeued"

# Nothing more will happen to the event (unless an operator replays a dead letter).
FINAL_STATUSES: Final = frozenset({REPLIED, NO_REPLY, DEAD_LETTERED})

# The label of `waddle_ai_event_handling_seconds{outcome}` for each status.
_HANDLING_LABELS: Final = {
    REPLIED: "replied", NO_REPLY: "skipped", RETRYING: "retried", DEFERRED: "deferred",
    DEAD_LETTERED: "dead_lettered", REQUEUED: "requeued",
}

# One sentence per no-reply reason, naming what to change when it is a setting.
REASON_TEXT: Final[dict[str, str]] = {
    "no_trigger": "no trigger: not a greeting, farewell, question (?), mention of the bot "
                  "(BOT_NAME) or a channel event",
    "command": "a !command meant for another bot",
    "bot_message": "sent by a bot (metadata is_bot, or a name in KNOWN_BOTS)",
    "own_message": "the bot's own message, echoed back by the platform",
    "event_type_disabled": "this event type is not answered in this community "
                           "(the community's event_types)",
    "empty_message": "the message is empty",
    "trigger_disabled": "what matched is switched off in this community (its triggers)",
    "community_disabled": "the community is disabled (config set C enabled=true to enable it)",
    "blocked_word": "the message contains one of the community's blocked_words",
    "duplicate": "already answered: a repeat delivery of an answered event (the marker is "
                 "kept DEDUPE_TTL_S)",
    ErrorType.STALE: "stale: older than MAX_EVENT_AGE_S",
    "user_cooldown": "user cooldown: this viewer was answered moments ago (USER_COOLDOWN_S)",
    "channel_cooldown": "channel cooldown: this channel was answered moments ago "
                        "(CHANNEL_COOLDOWN_S)",
    "rate_limited_user": "the viewer's rate limit is used up (the community's "
                         "user_rate_limit per user_rate_window_s)",
    "rate_limited_community": "the community's rate limit is used up (its "
                              "community_rate_limit per community_rate_window_s)",
    "rate_limited_proactive": "proactive chatter's rate limit is used up",
    ErrorType.IN_FLIGHT_ELSEWHERE: "another copy of this event is being answered; this one waits "
                           "in the delay queues",
    ErrorType.LEASE_LOST: "the answer took longer than this attempt's in-flight lease (the "
                  "provider's timeout + 15 s), so another copy may have taken over; it is "
                  "tried again after a delay",
}


def reason_text(reason: str) -> str:
    return REASON_TEXT.get(reason, reason.replace("_", " "))


def cooldown_detail(reason: str, cooldown_ms: int, left_ms: int | None) -> str:
    """E.g. "channel cooldown: a reply to this channel started 0.4 s ago, CHANNEL_COOLDOWN_S=2 …".

    "Started": the cooldown is claimed when an event is admitted, so the reply
    that holds it may still be on its way.
    """
    whose, setting = (("channel", "CHANNEL_COOLDOWN_S") if reason == "channel_cooldown"
                      else ("viewer", "USER_COOLDOWN_S"))
    what = reason.replace("_", " ")
    cooldown_s = cooldown_ms / 1000
    if left_ms is None:
        return (f"{what}: a reply to this {whose} started less than {cooldown_s:g} s ago, "
                f"{setting}={cooldown_s:g} (or the community's {setting.lower()})")
    ago_s = max(0.0, cooldown_s - left_ms / 1000)
    hint = "; a mention of the bot skips it" if reason == "channel_cooldown" else ""
    return (f"{what}: a reply to this {whose} started {ago_s:.1f} s ago, {setting}={cooldown_s:g} "
            f"(or the community's {setting.lower()}); {left_ms / 1000:.1f} s left{hint}")


def stale_detail(age_s: float, max_age_s: float) -> str:
    return (f"stale: the event is {age_s:.0f} s old (from sent_at, else its first receipt), "
            f"MAX_EVENT_AGE_S={max_age_s:g}; a late reply in chat is noise")


@dataclass(frozen=True, slots=True)
class Fate:
    """How one delivery was settled, and why, in words an operator can act on."""

    status: str
    reason: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return _HANDLING_LABELS[self.status]


def encode_outcome(
    event_id: str, fate: Fate, *, community_id: str | None, at: datetime | None = None
) -> bytes:
    record: dict[str, Any] = {
        "event_id": event_id,
        "status": fate.status,
        "reason": fate.reason,
        "detail": fate.detail,
        "final": fate.status in FINAL_STATUSES,
        "at": (at or datetime.now(UTC)).isoformat(),
    }
    if community_id is not None:
        record["community_id"] = community_id
    record.update(fate.extra)
    return orjson.dumps(record)


def decode_outcome(raw: bytes | str) -> dict[str, Any]:
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("an outcome is a JSON object")
    return data


def describe_outcome(record: dict[str, Any]) -> str:
    """One line for a terminal: `event E: no reply (channel_cooldown): channel cooldown: …`."""
    status = str(record.get("status", "?"))
    words = {REPLIED: "replied", NO_REPLY: "no reply", RETRYING: "retrying",
             DEFERRED: "waiting", DEAD_LETTERED: "dead-lettered",
             REQUEUED: "returned to the queue"}.get(status, status)
    return (f"event {record.get('event_id')}: {words} ({record.get('reason')}): "
            f"{record.get('detail')}")


class OutcomeRecorder:
    """The one step every settled delivery passes through: remember its fate."""

    def __init__(self, store: StateStore, *, ttl_s: int, max_pending: int = 256) -> None:
        if ttl_s <= 0 or max_pending < 1:
            raise ValueError("ttl_s and max_pending must be positive")
        self._store = store
        self._ttl_s = ttl_s
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()

    async def record(self, event_id: str, fate: Fate, *, community_id: str | None) -> None:
        """Remember `fate` in the background; in place when `max_pending` are in flight."""
        body = encode_outcome(event_id, fate, community_id=community_id)
        if len(self._pending) >= self._max_pending:
            await self._write(event_id, body)
            return
        task = asyncio.get_running_loop().create_task(self._write(event_id, body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, event_id: str, body: bytes) -> None:
        try:
            await self._store.put_outcome(event_id, body, self._ttl_s)
        except Exception as exc:
            # An outcome is an explanation, not state a reply depends on.
            log.warning("could not record an event's outcome", extra={
                "action": "record_outcome", "event_id": event_id, "error": repr(exc)})

    async def drain(self) -> None:
        """Finish the writes in flight (at stop, before the store closes)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
