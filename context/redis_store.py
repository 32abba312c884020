"""The state store shared by every worker replica, kept in Redis.

Each public call is one round trip: `admit()` and `record()` are Lua scripts,
so their check-then-claim steps are atomic on the server and no other replica
can slip in between them. Scripts run with EVALSHA; only after the server lost
its script cache (restart, failover, SCRIPT FLUSH) does the next call pay for
a SCRIPT LOAD and a second EVALSHA.

Key layout (`<p>` is the key prefix, e.g. `ai:`):

    <p>replied:<event_id>                                   "1"          reply marker
    <p>lease:<event_id>                                     attempt_id   in-flight lease
    <p>cd:u:<platform>:<community>:<channel>:<user>         event_id     user cooldown
    <p>cd:c:<platform>:<community>:<channel>                event_id     channel cooldown
    <p>hist:<platform>:<community>:<channel>:<user>         list of JSON conversation turns
    <p>outcome:<event_id>                                   JSON         what became of it

Platform, community, channel and user ids are percent-encoded (`%` -> `%25`,
`:` -> `%3A`) so that ids containing `:` cannot make two conversations share a
key. The event id is the key's only variable part, so it is used as is.

All keys of one event live in different hash slots: this store targets a
single Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.asyncio import Redis

from context.redis_pool import pooled_client
from context.store import Admission, AdmitRequest, RecordRequest, Verdict
from domain.conversation import ConversationKey, Turn

log = logging.getLogger(__name__)

# KEYS: marker, lease, user cooldown, channel cooldown, history, outbox
# ARGV: event_id, attempt_id, lease_ms, user_cooldown_ms, channel_cooldown_ms, history_turns
# A cooldown of 0 ms is neither checked nor claimed: this event has no such cooldown
# (a mention skips the channel's; a community may have none).
# Returns {code} when refused ({2, lease ms left} for a lease held elsewhere,
# {3 or 4, cooldown ms left} for a cooldown),
# {5, stashed reply} for a reply pending, {0, history entries} when admitted.
_ADMIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1}
end
local lease = redis.call('GET', KEYS[2])
if lease and lease ~= ARGV[2] then
  return {2, redis.call('PTTL', KEYS[2])}
end
local pending = redis.call('GET', KEYS[6])
if pending then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return {5, pending}
end
if tonumber(ARGV[4]) > 0 then
  local user_cd = redis.call('GET', KEYS[3])
  if user_cd and user_cd ~= ARGV[1] then
    return {3, redis.call('PTTL', KEYS[3])}
  end
end
if tonumber(ARGV[5]) > 0 then
  local channel_cd = redis.call('GET', KEYS[4])
  if channel_cd and channel_cd ~= ARGV[1] then
    return {4, redis.call('PTTL', KEYS[4])}
  end
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
end
if tonumber(ARGV[5]) > 0 then
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[5])
end
local n = tonumber(ARGV[6])
if n > 0 then
  return {0, redis.call('LRANGE', KEYS[5], -n, -1)}
end
return {0, {}}
"""

# KEYS: marker, lease, history, outbox
# ARGV: attempt_id, dedupe_ttl_ms, history_turns, history_ttl_s, turn...
_RECORD_LUA = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
local n = tonumber(ARGV[3])
if n > 0 and #ARGV > 4 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 5))
  redis.call('LTRIM', KEYS[3], -n, -1)
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
"""

# KEYS: lease, outbox; ARGV: attempt_id, reply, ttl_ms
# Only the lease holder may stash: a reply of an attempt that lost its lease
# must not become the one a later attempt republishes.
_STASH_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS: lease; ARGV: attempt_id, lease_ms
# Only the holder renews: a lease another attempt took over is left alone.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease, then any cooldowns to give back; ARGV: attempt_id, event_id
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2] then
    redis.call('DEL', KEYS[i])
  end
end
return 1
"""

_REFUSALS = {
    1: Verdict.ALREADY_ANSWERED,
    2: Verdict.IN_FLIGHT_ELSEWHERE,
    3: Verdict.USER_COOLDOWN,
    4: Verdict.CHANNEL_COOLDOWN,
}


def _part(value: str) -> str:
    """Escape one key part, so that `:` inside an id cannot shift a part boundary."""
    return value.replace("%", "%25").replace(":", "%3A")


class _Keys:
    """Builds every key in one place, so the layout documented above is the only one."""

    __slots__ = ("_prefix",)

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def marker(self, event_id: str) -> str:
        return f"{self._prefix}replied:{event_id}"

    def lease(self, event_id: str) -> str:
        return f"{self._prefix}lease:{event_id}"

    def outbox(self, event_id: str) -> str:
        return f"{self._prefix}outbox:{event_id}"

    def outcome(self, event_id: str) -> str:
        return f"{self._prefix}outcome:{event_id}"

    def channel_cooldown(self, key: ConversationKey) -> str:
        return f"{self._prefix}cd:c:{self._channel(key)}"

    def user_cooldown(self, key: ConversationKey) -> str:
        return f"{self._prefix}cd:u:{self._channel(key)}:{_part(key.user_id)}"

    def history(self, key: ConversationKey) -> str:
        return f"{self._prefix}hist:{self._channel(key)}:{_part(key.user_id)}"

    @staticmethod
    def _channel(key: ConversationKey) -> str:
        return f"{_part(key.platform)}:{_part(key.community_id)}:{_part(key.channel_id)}"


def _encode_turn(turn: Turn) -> bytes:
    """Short field names: the history is read on every event, so every byte is paid often."""
    return orjson.dumps({"r": turn.role, "c": turn.content, "s": turn.speaker})


def _decode_turn(raw: bytes | str) -> Turn | None:
    """None for an entry that is not a turn, so one bad entry cannot block a conversation."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    role, content, speaker = data.get("r"), data.get("c"), data.get("s")
    if role not in ("user", "assistant") or not isinstance(content, str):
        return None
    if speaker is not None and not isinstance(speaker, str):
        return None
    return Turn(role=role, content=content, speaker=speaker)


class RedisStateStore:
    """StateStore over one Redis, so replicas share markers, leases, cooldowns and history.

    `history_turns` counts entries: a user message and the assistant's reply
    are two. `record()` keeps the last `history_turns` entries and restarts
    the history's `history_ttl_s` on every write; `admit()` reads it without
    extending it.
    """

    def __init__(self, client: Redis, key_prefix: str, *, owns_client: bool = False) -> None:
        self._client = client
        self._keys = _Keys(key_prefix)
        self._owns_client = owns_client
        self._admit_script = client.register_script(_ADMIT_LUA)
        self._record_script = client.register_script(_RECORD_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        self._stash_script = client.register_script(_STASH_LUA)
        self._renew_script = client.register_script(_RENEW_LUA)

    @classmethod
    def from_url(cls, url: str, key_prefix: str, **client_options: Any) -> RedisStateStore:
        """A store with its own connection pool, which `aclose()` then closes.

        The pool (context/redis_pool.py) waits for a free connection rather
        than failing as if Redis were down: many events in flight is load.
        """
        return cls(pooled_client(url, **client_options), key_prefix, owns_client=True)

    @property
    def backend(self) -> str:
        return "redis"

    async def admit(self, request: AdmitRequest) -> Admission:
        key = request.key
        result = await self._admit_script(
            keys=[
                self._keys.marker(request.event_id),
                self._keys.lease(request.event_id),
                self._keys.user_cooldown(key),
                self._keys.channel_cooldown(key),
                self._keys.history(key),
                self._keys.outbox(request.event_id),
            ],
            args=[
                request.event_id,
                request.attempt_id,
                request.lease_ms,
                request.user_cooldown_ms,
                request.channel_cooldown_ms,
                request.history_turns,
            ],
        )
        code = int(result[0])
        if code == 5:
            return Admission(Verdict.REPLY_PENDING, pending_reply=bytes(result[1]))
        if code == 2:
            left = int(result[1])  # -1: a lease without expiry, which we never set
            return Admission(Verdict.IN_FLIGHT_ELSEWHERE,
                             lease_left_ms=left if left >= 0 else None)
        if code in (3, 4):
            left = int(result[1]) if len(result) > 1 else -1
            return Admission(_REFUSALS[code], cooldown_left_ms=left if left >= 0 else None)
        if code != 0:
            return Admission(_REFUSALS[code])
        history: list[Turn] = []
        for raw in result[1]:
            turn = _decode_turn(raw)
            if turn is None:
                log.warning("skipping a history entry that is not a turn in %s",
                            self._keys.history(key))
                continue
            history.append(turn)
        return Admission(Verdict.ADMITTED, history)

    async def record(self, request: RecordRequest) -> None:
        n = request.history_turns
        # Entries that LTRIM would drop at once are not worth sending.
        turns = request.turns[-n:] if n > 0 else []
        await self._record_script(
            keys=[
                self._keys.marker(request.event_id),
                self._keys.lease(request.event_id),
                self._keys.history(request.key),
                self._keys.outbox(request.event_id),
            ],
            args=[
                request.attempt_id,
                request.dedupe_ttl_s * 1000,
                n,
                request.history_ttl_s,
                *(_encode_turn(turn) for turn in turns),
            ],
        )

    async def stash_reply(
        self, event_id: str, attempt_id: str, reply: bytes, ttl_ms: int
    ) -> bool:
        stashed = await self._stash_script(
            keys=[self._keys.lease(event_id), self._keys.outbox(event_id)],
            args=[attempt_id, reply, ttl_ms],
        )
        return bool(stashed)

    async def renew_lease(self, event_id: str, attempt_id: str, lease_ms: int) -> bool:
        renewed = await self._renew_script(
            keys=[self._keys.lease(event_id)], args=[attempt_id, lease_ms])
        return bool(renewed)

    async def release(
        self, event_id: str, attempt_id: str, *, cooldowns: ConversationKey | None = None
    ) -> None:
        keys = [self._keys.lease(event_id)]
        if cooldowns is not None:
            keys += [self._keys.user_cooldown(cooldowns), self._keys.channel_cooldown(cooldowns)]
        await self._release_script(keys=keys, args=[attempt_id, event_id])

    async def was_answered(self, event_id: str) -> bool:
        return bool(await self._client.exists(self._keys.marker(event_id)))

    async def put_outcome(self, event_id: str, outcome: bytes, ttl_s: int) -> None:
        await self._client.set(self._keys.outcome(event_id), outcome, ex=ttl_s)

    async def get_outcome(self, event_id: str) -> bytes | None:
        found: bytes | str | None = await self._client.get(self._keys.outcome(event_id))
        return found.encode() if isinstance(found, str) else found

    async def ping(self) -> None:
        if not await self._client.ping():
            raise ConnectionError("Redis did not answer PING")

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
