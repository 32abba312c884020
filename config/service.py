"""Per-community config from PostgreSQL, cached per replica, invalidated by NOTIFY.

The pipeline asks for a profile on every event, so the answer must come from
memory: each replica caches the merged profile of each community for `ttl_s`.
A change must still reach every replica at once (an operator who switches a
bot off expects silence now, not in half a minute), so:

* A trigger on `ai_module_config` sends `pg_notify('ai_module_config', id)`
  at commit, for any writer (the CLI, psql, another tool).
* Each replica keeps one dedicated connection that LISTENs on that channel
  and marks the named community stale, so its next event reloads it.
* A load that started before a notification and ends after it is not
  trusted (its result is served once, then reloaded): a per-community
  generation number tells them apart.
* If the LISTEN connection drops, notifications sent meanwhile are lost: the
  listener reconnects with backoff and marks every entry stale when it is
  back. A periodic ping finds a connection that died silently.
* The TTL bounds staleness while the listener is down.

The database must never stop replies: when a load fails (database down, slow,
or a row this version cannot read), the last profile loaded from the
database keeps serving, and a community never loaded gets the environment
defaults. One warning marks the start of an outage, one info line its end,
and a failed community is retried after `retry_after_s` rather than on every
event, so a dead database costs no event more than `load_timeout_s`.

Stale entries are kept (only marked stale), never dropped, because they are
exactly what the database-down path serves. The cache holds one small
profile per community seen by this replica.

Cold start without any database is the app's choice, not this class's: with
no `DATABASE_URL` the app uses `EnvCommunityConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from config.community import CommunityConfigSource, EnvCommunityConfig
from config.database import (
    Connection,
    Pool,
    connect,
    create_pool,
    is_unavailable,
    redact_dsn,
)
from config.migrate import migrate
from config.repository import TABLE, CommunityConfigRecord, record_from_row
from config.secrets import KeyBox, KeyBoxError
from config.settings import Settings
from domain.community import (
    DEFAULT_PROACTIVE_MIN_LENGTH,
    DEFAULT_PROACTIVE_PROBABILITY,
    CommunityProfile,
    ProactivePolicy,
    RateLimit,
)
from domain.persona import Persona
from domain.provider_names import ProviderName
from domain.secret import Secret
from domain.triggers import TriggerRules

log = logging.getLogger(__name__)

CHANNEL: Final = "ai_module_config"
ALL_COMMUNITIES: Final = "*"
LISTENER_APPLICATION_NAME: Final = "waddle-ai-config-listener"


def _rate(limit: int | None, window_s: int | None) -> RateLimit | None:
    if limit is None or window_s is None:
        return None
    return RateLimit(limit=limit, window_s=float(window_s))


def _without(primary: ProviderName, chain: Sequence[ProviderName]) -> tuple[ProviderName, ...]:
    """Fallbacks in order, without the primary (trying it twice would only double a failure)."""
    return tuple(dict.fromkeys(name for name in chain if name != primary))


def merge_profile(
    base: CommunityProfile, record: CommunityConfigRecord, api_key: Secret | None = None
) -> CommunityProfile:
    """The community's own values over `base` (the environment's), field by field."""
    bot_name = record.bot_name if record.bot_name is not None else base.persona.bot_name
    persona = Persona(
        bot_name=bot_name,
        system_prompt=(record.system_prompt if record.system_prompt is not None
                       else base.persona.system_prompt),
        max_reply_chars=(record.max_reply_chars if record.max_reply_chars is not None
                         else base.persona.max_reply_chars),
    )
    rules = base.trigger_rules
    if record.bot_name is not None or record.triggers is not None or (
            record.event_types is not None or record.greeting_words is not None
            or record.farewell_words is not None):
        rules = TriggerRules(
            bot_name=bot_name,
            known_bots=rules.known_bots,
            enabled_triggers=(frozenset(record.triggers) if record.triggers is not None
                              else rules.enabled_triggers),
            answered_events=(frozenset(record.event_types) if record.event_types is not None
                             else rules.answered_events),
            greeting_words=(record.greeting_words if record.greeting_words is not None
                            else rules.greeting_words),
            farewell_words=(record.farewell_words if record.farewell_words is not None
                            else rules.farewell_words),
        )
    provider = record.provider if record.provider is not None else base.provider
    fallbacks = (record.fallback_providers if record.fallback_providers is not None
                 else base.fallback_providers)
    proactive: ProactivePolicy | None = None
    if record.proactive_enabled:
        proactive = ProactivePolicy(
            enabled=True,
            probability=(record.proactive_probability
                         if record.proactive_probability is not None
                         else DEFAULT_PROACTIVE_PROBABILITY),
            min_length=(record.proactive_min_length if record.proactive_min_length is not None
                        else DEFAULT_PROACTIVE_MIN_LENGTH),
            rate_limit=_rate(record.proactive_rate_limit, record.proactive_rate_window_s),
        )

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return CommunityProfile(
        community_id=base.community_id,
        enabled=record.enabled,
        persona=persona,
        trigger_rules=rules,
        provider=provider,
        fallback_providers=_without(provider, fallbacks),
        model=pick(record.model, base.model),
        temperature=pick(record.temperature, base.temperature),
        max_tokens=pick(record.max_tokens, base.max_tokens),
        response_prefix=pick(record.response_prefix, base.response_prefix),
        user_cooldown_ms=(round(record.user_cooldown_s * 1000)
                          if record.user_cooldown_s is not None else base.user_cooldown_ms),
        channel_cooldown_ms=(round(record.channel_cooldown_s * 1000)
                             if record.channel_cooldown_s is not None
                             else base.channel_cooldown_ms),
        history_turns=base.history_turns,
        max_reply_chars=persona.max_reply_chars,
        allow_links=pick(record.allow_links, base.allow_links),
        provider_base_url=pick(record.base_url, base.provider_base_url),
        provider_api_key=api_key if api_key is not None else base.provider_api_key,
        model_by_trigger=(MappingProxyType({str(k): v for k, v in record.model_by_trigger.items()})
                          if record.model_by_trigger is not None else base.model_by_trigger),
        blocked_words=pick(record.blocked_words, base.blocked_words),
        user_rate_limit=(_rate(record.user_rate_limit, record.user_rate_window_s)
                         or base.user_rate_limit),
        community_rate_limit=(_rate(record.community_rate_limit, record.community_rate_window_s)
                              or base.community_rate_limit),
        proactive=proactive,
        persist_context=record.persist_context,
    )


@dataclass(slots=True)
class _Entry:
    profile: CommunityProfile
    # Loop time after which the next event reloads; -inf marks it stale at once.
    expires_at: float
    # True: what the database said (a row, or no row). False: env defaults standing
    # in while the database could not be asked; never served as "last known".
    confirmed: bool


class DatabaseCommunityConfig:
    """`CommunityConfigSource` backed by `ai_module_config` (see the module docstring)."""

    def __init__(
        self,
        pool: Pool,
        settings: Settings,
        keybox: KeyBox,
        *,
        ttl_s: float = 30.0,
        listen: bool = True,
        listen_dsn: str | None = None,
        load_timeout_s: float = 2.0,
        retry_after_s: float = 5.0,
        reconnect_delay_s: float = 0.5,
        max_reconnect_delay_s: float = 30.0,
        ping_interval_s: float = 15.0,
    ) -> None:
        if ttl_s < 0 or load_timeout_s <= 0 or retry_after_s < 0:
            raise ValueError("ttl_s and retry_after_s must be >= 0, load_timeout_s > 0")
        self._pool = pool
        self._keybox = keybox
        self._env = EnvCommunityConfig(settings)
        self._ttl_s = ttl_s
        self._listen = listen
        self._listen_dsn = listen_dsn or settings.database_url
        if listen and not self._listen_dsn:
            raise ValueError("listening for config changes needs DATABASE_URL (or listen_dsn)")
        self._load_timeout_s = load_timeout_s
        self._retry_after_s = retry_after_s
        self._reconnect_delay_s = reconnect_delay_s
        self._max_reconnect_delay_s = max_reconnect_delay_s
        self._ping_interval_s = ping_interval_s

        self._cache: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Task[CommunityProfile]] = {}
        # Bumped by every invalidation: a load that saw another number is not cached.
        self._generation: dict[str, int] = {}
        self._all_generation = 0

        self._degraded = False
        self._warned_defaults: set[str] = set()
        self._warned_broken: set[str] = set()
        self._listener_task: asyncio.Task[None] | None = None
        self._listener_connection: Connection | None = None
        # The schema our table lives in, as the listener connection sees it.
        self._listen_schema: str | None = None
        self._listening = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._listener_failed = False
        self._closed = False

    # Lifecycle

    async def start(self, *, wait_s: float = 5.0) -> None:
        """Start listening: wait for the first attempt (up to `wait_s`), never fail on it."""
        if self._listen and self._listener_task is None:
            self._listener_task = asyncio.create_task(
                self._listen_forever(), name="community-config-listener")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._first_attempt.wait()

    async def aclose(self) -> None:
        self._closed = True
        task, self._listener_task = self._listener_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loads = list(self._loading.values())
        if loads:
            await asyncio.gather(*loads, return_exceptions=True)

    async def wait_listening(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._listening.wait()
        except TimeoutError:
            return False
        return True

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    @property
    def listener_pid(self) -> int | None:
        """The listener's server process (for `pg_terminate_backend` in tests and ops)."""
        connection = self._listener_connection
        return None if connection is None else connection.get_server_pid()

    def health(self) -> dict[str, Any]:
        """For `/readyz`: degraded still answers, from the last known configs."""
        return {
            "status": "degraded" if self._degraded or (self._listen and not self.listening)
            else "ok",
            "listening": self.listening,
            "cached_communities": len(self._cache),
        }

    # CommunityConfigSource

    async def profile(self, community_id: str) -> CommunityProfile:
        entry = self._cache.get(community_id)
        if entry is not None and entry.expires_at > self._now():
            return entry.profile
        task = self._loading.get(community_id)
        if task is None:
            # One load per community however many events wait for it; shielded so
            # a cancelled event does not cancel the load the others wait on.
            task = asyncio.create_task(self._refresh(community_id))
            self._loading[community_id] = task
            task.add_done_callback(lambda done: self._forget_load(community_id, done))
        return await asyncio.shield(task)

    def invalidate(self, community_id: str | None = None) -> None:
        """Mark one community (or all) stale; kept, so a dead database can still serve it."""
        if community_id is None or community_id == ALL_COMMUNITIES:
            self._all_generation += 1
            for entry in self._cache.values():
                entry.expires_at = -math.inf
            return
        self._generation[community_id] = self._generation.get(community_id, 0) + 1
        cached = self._cache.get(community_id)
        if cached is not None:
            cached.expires_at = -math.inf

    # Loading

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _forget_load(self, community_id: str, task: asyncio.Task[CommunityProfile]) -> None:
        if self._loading.get(community_id) is task:
            del self._loading[community_id]

    def _token(self, community_id: str) -> tuple[int, int]:
        return self._all_generation, self._generation.get(community_id, 0)

    async def _refresh(self, community_id: str) -> CommunityProfile:
        token = self._token(community_id)
        try:
            async with asyncio.timeout(self._load_timeout_s):
                row = await self._pool.fetchrow(
                    f"select * from {TABLE} where community_id = $1", community_id)
            profile = await self._build(community_id, row)
        except Exception as exc:
            return await self._fall_back(community_id, exc)
        self._recovered(community_id)
        fresh = self._token(community_id) == token
        self._cache[community_id] = _Entry(
            profile=profile,
            expires_at=self._now() + self._ttl_s if fresh else -math.inf,
            confirmed=True,
        )
        return profile

    async def _build(self, community_id: str, row: Any) -> CommunityProfile:
        base = await self._env.profile(community_id)
        if row is None:
            return base
        record = record_from_row(row)
        return merge_profile(base, record, self._api_key(record))

    def _api_key(self, record: CommunityConfigRecord) -> Secret | None:
        if record.api_key_encrypted is None:
            return None
        try:
            return self._keybox.decrypt_secret(record.api_key_encrypted)
        except KeyBoxError as exc:
            # The community runs without its own key; the message never holds the key.
            log.error("community's provider key cannot be decrypted; it is not used", extra={
                "action": "config_load", "community": record.community_id,
                "error": str(exc), "category": "error"})
            return None

    async def _fall_back(self, community_id: str, exc: Exception) -> CommunityProfile:
        previous = self._cache.get(community_id)
        if previous is not None and previous.confirmed:
            profile, confirmed, served = previous.profile, True, "last known config"
        else:
            profile, confirmed = await self._env.profile(community_id), False
            served = "environment defaults"
        self._cache[community_id] = _Entry(
            profile=profile, expires_at=self._now() + self._retry_after_s, confirmed=confirmed)
        self._report_failure(community_id, exc, served)
        return profile

    def _report_failure(self, community_id: str, exc: Exception, served: str) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if is_unavailable(exc):
            if not self._degraded:
                self._degraded = True
                log.warning(
                    "community config database unavailable: serving the last known configs, "
                    "and environment defaults to communities never loaded",
                    extra={"action": "config_load", "result": "degraded", "error": error,
                           "category": "system"})
            if served == "environment defaults" and community_id not in self._warned_defaults:
                self._warned_defaults.add(community_id)
                log.warning("community config never loaded; serving environment defaults",
                            extra={"action": "config_load", "community": community_id,
                                   "result": "env_defaults", "category": "system"})
            return
        if community_id not in self._warned_broken:
            self._warned_broken.add(community_id)
            log.error(f"community config cannot be loaded; serving {served}", extra={
                "action": "config_load", "community": community_id, "error": error,
                "result": "fallback", "category": "error"})

    def _recovered(self, community_id: str) -> None:
        self._warned_broken.discard(community_id)
        if self._degraded:
            self._degraded = False
            self._warned_defaults.clear()
            log.info("community config database reachable again", extra={
                "action": "config_load", "result": "recovered", "category": "system"})

    # Listening

    def _on_notification(
        self, _connection: object, _pid: int, _channel: str, payload: str
    ) -> None:
        community_id = notified_community(payload, self._listen_schema)
        if community_id is not None:
            self.invalidate(community_id)

    async def _listen_forever(self) -> None:
        assert self._listen_dsn is not None
        delay = self._reconnect_delay_s
        connected_before = False
        while not self._closed:
            connection: Connection | None = None
            try:
                connection = await connect(
                    self._listen_dsn,
                    server_settings={"application_name": LISTENER_APPLICATION_NAME})
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _conn, event=lost: event.set())
                # The channel is the database's: notifications name the schema
                # whose table changed (migration 0002), and only ours count.
                self._listen_schema = str(await connection.fetchval("select current_schema()"))
                await connection.add_listener(CHANNEL, self._on_notification)
                # Changes made while nobody listened were never announced to us.
                self.invalidate(ALL_COMMUNITIES)
                self._listener_connection = connection
                self._listening.set()
                self._first_attempt.set()
                delay = self._reconnect_delay_s
                if connected_before or self._listener_failed:
                    log.info("config listener reconnected; cached configs marked stale", extra={
                        "action": "config_listen", "result": "reconnected",
                        "category": "system"})
                self._listener_failed = False
                connected_before = True
                await self._watch(connection, lost)
            except Exception as exc:
                if not self._listener_failed:
                    self._listener_failed = True
                    log.warning("config listener cannot listen; retrying with backoff", extra={
                        "action": "config_listen", "result": "disconnected",
                        "dsn": redact_dsn(self._listen_dsn),
                        "error": f"{type(exc).__name__}: {exc}", "category": "system"})
            finally:
                self._first_attempt.set()
                self._listening.clear()
                self._listener_connection = None
                if connection is not None:
                    await _drop(connection)
            if connected_before and not self._listener_failed:
                # It was up and just dropped: say so once, then reconnect.
                self._listener_failed = True
                log.warning("config listener connection lost; reconnecting", extra={
                    "action": "config_listen", "result": "disconnected", "category": "system"})
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_reconnect_delay_s)

    async def _watch(self, connection: Connection, lost: asyncio.Event) -> None:
        """Return when the connection is gone, noticed by asyncpg or by a failed ping."""
        while not lost.is_set():
            try:
                async with asyncio.timeout(self._ping_interval_s):
                    await lost.wait()
                return
            except TimeoutError:
                pass
            try:
                async with asyncio.timeout(self._load_timeout_s):
                    await connection.fetchval("select 1")
            except Exception:
                return


@dataclass(slots=True)
class OpenedCommunityConfig:
    """What the app holds: the source the pipeline reads, and what to close at the end."""

    source: CommunityConfigSource
    pool: Pool | None = None
    service: DatabaseCommunityConfig | None = None

    def health(self) -> dict[str, Any]:
        if self.service is None:
            return {"status": "disabled"}
        return self.service.health()

    async def aclose(self) -> None:
        if self.service is not None:
            await self.service.aclose()
        if self.pool is not None:
            await self.pool.close()


async def open_community_config(
    settings: Settings, *, run_migrations: bool = True, **options: Any
) -> OpenedCommunityConfig:
    """The source for this deployment: the environment alone without `DATABASE_URL`.

    With a database, the schema is migrated first (safe from every replica at
    once), but a database that is down at start only degrades the worker: it
    starts, serves environment defaults, and picks configs up once the
    database answers. A bad `CONFIG_ENCRYPTION_KEY` does stop the start, as
    any bad setting does. `options` go to `DatabaseCommunityConfig`.
    """
    if not settings.database_url:
        return OpenedCommunityConfig(source=EnvCommunityConfig(settings))
    keybox = KeyBox.from_setting(settings.config_encryption_key)
    pool = await create_pool(settings.database_url)
    if run_migrations:
        try:
            await migrate(pool)
        except Exception as exc:
            if not (is_unavailable(exc) or (
                    exc.__cause__ is not None and is_unavailable(exc.__cause__))):
                await pool.close()
                raise
            log.warning("database unavailable at start; not migrated, serving env defaults",
                        extra={"action": "migrate", "result": "skipped",
                               "dsn": redact_dsn(settings.database_url),
                               "error": f"{type(exc).__name__}: {exc}", "category": "system"})
    service = DatabaseCommunityConfig(pool, settings, keybox, **options)
    await service.start()
    return OpenedCommunityConfig(source=service, pool=pool, service=service)


async def _drop(connection: Connection) -> None:
    if connection.is_closed():
        return
    try:
        await asyncio.wait_for(connection.close(), timeout=1.0)
    except (Exception, asyncio.CancelledError):
        connection.terminate()


def notified_community(payload: str, schema: str | None) -> str | None:
    """The community a notification invalidates here, or None when it is another schema's.

    `<schema>:<id>` / `<schema>:*` since migration 0002; a bare `<id>` or `*`
    (or nothing) comes from a replica of the previous version and counts as ours.
    """
    if not payload:
        return ALL_COMMUNITIES
    scope, colon, community_id = payload.partition(":")
    if not colon:
        return payload
    if schema is not None and scope != schema:
        return None
    return community_id or ALL_COMMUNITIES


__all__ = [
    "ALL_COMMUNITIES",
    "CHANNEL",
    "LISTENER_APPLICATION_NAME",
    "DatabaseCommunityConfig",
    "OpenedCommunityConfig",
    "merge_profile",
    "notified_community",
    "open_community_config",
]
