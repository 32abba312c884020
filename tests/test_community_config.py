"""Per-community config in PostgreSQL: migrations, validation, secrets, cache, NOTIFY.

Every test runs against the real server in a schema of its own (`test_<hex>`,
bound through the DSN's `search_path`), dropped afterwards, so runs never see
each other's rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from config.community import EnvCommunityConfig
from config.database import Pool, create_pool, redact_dsn
from config.migrate import MigrationError, applied_versions, load_migrations, migrate
from config.repository import (
    SETTABLE_FIELDS,
    CommunityConfigRecord,
    ConfigRepository,
    ConfigValidationError,
    parse_assignments,
)
from config.secrets import (
    DecryptionError,
    EncryptionDisabledError,
    KeyBox,
    KeyBoxError,
    generate_key,
)
from config.service import (
    ALL_COMMUNITIES,
    CHANNEL,
    DatabaseCommunityConfig,
    merge_profile,
    notified_community,
    open_community_config,
)
from config.settings import Settings
from domain.community import CommunityProfile, RateLimit
from domain.conversation import ConversationKey, Turn
from domain.provider_names import ProviderName
from domain.secret import Secret, mask
from schemas.events import MessageType
from schemas.replies import Trigger
from tests.conftest import DATABASE_URL, with_search_path

API_KEY = "sk-live-0123456789abcdefWXYZ"
ALL_MIGRATIONS = [migration.version for migration in load_migrations()]


def unique_community() -> str:
    """For tests that must *not* be notified: NOTIFY channels are per database, so a
    concurrent run of an older version in another schema notifying "c" would reach us."""
    return f"c-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pool(schema_dsn: str) -> AsyncIterator[Pool]:
    created = await create_pool(schema_dsn, max_size=4)
    await migrate(created)
    try:
        yield created
    finally:
        await created.close()


@pytest.fixture
def settings(schema_dsn: str) -> Settings:
    return Settings(_env_file=None, database_url=schema_dsn, ai_provider="ollama",
                    ai_fallback_providers=["local"], ai_temperature=0.7, ai_max_tokens=500,
                    bot_name="waddlebot", user_cooldown_s=10, channel_cooldown_s=2)


@pytest.fixture
def keybox() -> KeyBox:
    return KeyBox([generate_key()])


@pytest.fixture
async def make_service(
    settings: Settings, keybox: KeyBox, schema_dsn: str
) -> AsyncIterator[Callable[..., Awaitable[DatabaseCommunityConfig]]]:
    started: list[DatabaseCommunityConfig] = []

    async def build(pool: Pool, **options: Any) -> DatabaseCommunityConfig:
        options.setdefault("listen", False)
        options.setdefault("reconnect_delay_s", 0.05)
        service = DatabaseCommunityConfig(pool, settings, keybox, listen_dsn=schema_dsn,
                                          **options)
        await service.start()
        started.append(service)
        return service

    yield build
    for service in started:
        await service.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Seconds until `check` held; fails the test after `within_s`."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within_s:
            pytest.fail(f"condition not met within {within_s} s")
        await asyncio.sleep(0.02)


# Migrations


async def test_migrations_apply_record_and_rerun_is_noop(schema_dsn: str) -> None:
    schema = schema_dsn.rsplit("=", 1)[1]
    assert await migrate(schema_dsn) == ALL_MIGRATIONS
    assert await applied_versions(schema_dsn) == ALL_MIGRATIONS
    assert await migrate(schema_dsn) == []

    connection = await asyncpg.connect(DATABASE_URL)
    try:
        tables = {row["table_name"] for row in await connection.fetch(
            "select table_name from information_schema.tables where table_schema = $1", schema)}
    finally:
        await connection.close()
    assert {"ai_schema_migrations", "ai_module_config", "ai_conversation_context"} <= tables


async def test_concurrent_migrations_apply_once(schema_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(schema_dsn) for _ in range(3)))
    assert sorted(version for result in results for version in result) == ALL_MIGRATIONS
    assert sum(1 for result in results if result) == 1


async def test_failed_migration_keeps_earlier_ones(schema_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("create table ok_table (id int);")
    (tmp_path / "0002_bad.sql").write_text("create table bad_table (id int); select 1/0;")
    with pytest.raises(MigrationError, match="0002_bad"):
        await migrate(schema_dsn, directory=tmp_path)
    assert await applied_versions(schema_dsn) == ["0001_ok"]
    connection = await asyncpg.connect(schema_dsn)
    try:
        assert await connection.fetchval("select to_regclass('bad_table')") is None
    finally:
        await connection.close()


# Validation


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("temperature", 2.5, "temperature_range"),
        ("max_tokens", 0, "max_tokens_range"),
        ("provider", "openai", "provider_known"),
        ("triggers", ["greeting", "shout"], "triggers_known"),
        ("event_types", ["chatMessage"], "event_types_known"),
        ("max_reply_chars", 0, "max_reply_chars_range"),
        ("proactive_probability", 1.5, "proactive_probability_range"),
        ("base_url", "ftp://models.example", "base_url_http"),
        ("api_key_encrypted", API_KEY, "api_key_is_token"),
        ("user_rate_limit", 5, "user_rate_pair"),
        ("model_by_trigger", '{"shout": "llama3"}', "model_by_trigger_valid"),
    ],
)
async def test_check_constraints_reject_bad_rows(
    pool: Pool, column: str, value: Any, constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await pool.execute(
            f"insert into ai_module_config (community_id, {column}) values ('c', $1)", value)
    assert caught.value.constraint_name == f"ai_module_config_{constraint}"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": 5}, "temperature: Input should be less than or equal to 2"),
        ({"provider": "openai"}, "provider: Input should be 'local', 'ollama' or 'waddleai'"),
        ({"base_url": "ftp://x"}, "base_url: must be an http:// or https:// URL"),
        ({"base_url": "http://user:pw@host"}, "must not contain credentials"),
        ({"triggers": "greeting,shout"}, "triggers.1: Input should be"),
        ({"event_types": ["chatMessage"]}, "chatMessage is not an event type"),
        ({"model_by_trigger": {"shout": "x"}}, "model_by_trigger.shout"),
        ({"user_rate_limit": 3}, "user_rate_limit and user_rate_window_s are set together"),
        ({"provider": "local", "fallback_providers": "local"}, "must not repeat provider"),
        ({"colour": "blue"}, "colour: unknown setting"),
        ({"max_reply_chars": 0}, "max_reply_chars: Input should be greater than or equal to 1"),
    ],
)
async def test_repository_rejects_invalid_changes_clearly(
    pool: Pool, keybox: KeyBox, changes: dict[str, Any], message: str
) -> None:
    repository = ConfigRepository(pool, keybox)
    with pytest.raises(ConfigValidationError, match="invalid config for community 'c'") as caught:
        await repository.upsert("c", changes)
    assert message in str(caught.value)
    assert await repository.get("c") is None


async def test_storing_a_key_without_encryption_key_is_refused(pool: Pool) -> None:
    repository = ConfigRepository(pool)
    with pytest.raises(EncryptionDisabledError,
                       match="storing a provider key needs CONFIG_ENCRYPTION_KEY"):
        await repository.upsert("c", {"api_key": API_KEY})
    assert await repository.get("c") is None


# CRUD


async def test_upsert_get_list_delete(pool: Pool, keybox: KeyBox) -> None:
    repository = ConfigRepository(pool, keybox)
    first = await repository.upsert("penguins", {
        "temperature": 0.3, "triggers": "question,mention", "model": "llama3.1:8b",
        "model_by_trigger": "event=llama3.2:1b", "user_rate_limit": 5,
        "user_rate_window_s": 60, "blocked_words": ["foo", "foo", " bar "]})
    assert first.temperature == 0.3
    assert first.triggers == (Trigger.QUESTION, Trigger.MENTION)
    assert first.model_by_trigger == {Trigger.EVENT: "llama3.2:1b"}
    assert first.blocked_words == ("foo", "bar")
    assert first.created_at is not None
    assert first.updated_at is not None

    await asyncio.sleep(0.01)
    second = await repository.upsert("penguins", {"max_tokens": 200, "model": None})
    assert second.temperature == 0.3  # untouched
    assert second.max_tokens == 200
    assert second.model is None  # None clears
    assert second.updated_at is not None
    assert second.updated_at > first.updated_at
    assert second.created_at == first.created_at

    await repository.upsert("albatross", {"enabled": False})
    assert [record.community_id for record in await repository.list()] == [
        "albatross", "penguins"]
    assert await repository.get("penguins") == second

    cleared = await repository.upsert("albatross", {"enabled": None})
    assert cleared.enabled is True  # NOT NULL flags go back to their default
    assert await repository.delete("albatross") is True
    assert await repository.delete("albatross") is False
    assert await repository.get("albatross") is None
    assert "api_key" in SETTABLE_FIELDS
    assert "api_key_encrypted" not in SETTABLE_FIELDS


# Secrets


async def test_api_key_encrypted_at_rest_and_decrypted_in_profile(
    pool: Pool, keybox: KeyBox, make_service: Callable[..., Awaitable[DatabaseCommunityConfig]]
) -> None:
    repository = ConfigRepository(pool, keybox)
    record = await repository.upsert("c", {"api_key": API_KEY, "provider": "waddleai",
                                          "base_url": "https://proxy.example/v1/"})
    assert record.api_key_encrypted is not None
    assert API_KEY not in repr(record)

    stored = await pool.fetchval("select api_key_encrypted from ai_module_config")
    assert stored != API_KEY
    assert API_KEY not in stored
    row_text = await pool.fetchval("select t::text from ai_module_config t")
    assert API_KEY not in row_text

    display = record.to_display(keybox)
    assert display["api_key"] == "sk-…WXYZ"
    assert "api_key_encrypted" not in display

    service = await make_service(pool)
    profile = await service.profile("c")
    assert profile.provider_api_key is not None
    assert profile.provider_api_key.reveal() == API_KEY
    assert profile.provider_base_url == "https://proxy.example/v1"
    assert API_KEY not in repr(profile)
    assert API_KEY not in str(profile.provider_api_key)


async def test_rotate_keys_reencrypts_with_the_newest_key(pool: Pool) -> None:
    old_key, new_key = generate_key(), generate_key()
    await ConfigRepository(pool, KeyBox([old_key])).upsert("a", {"api_key": API_KEY})
    await ConfigRepository(pool, KeyBox([old_key])).upsert("b", {"api_key": "sk-other-key-999999"})
    await ConfigRepository(pool, KeyBox([old_key])).upsert("c", {"temperature": 1})
    before = await pool.fetchval("select api_key_encrypted from ai_module_config "
                                 "where community_id = 'a'")

    rotating = KeyBox.from_setting(f"{new_key}, {old_key}")
    assert await ConfigRepository(pool).rotate_keys(rotating) == 2

    after = await pool.fetchval("select api_key_encrypted from ai_module_config "
                                "where community_id = 'a'")
    assert after != before
    assert KeyBox([new_key]).decrypt(after) == API_KEY
    with pytest.raises(DecryptionError):
        KeyBox([old_key]).decrypt(after)


async def test_rotation_is_all_or_nothing(pool: Pool) -> None:
    known, lost = generate_key(), generate_key()
    await ConfigRepository(pool, KeyBox([known])).upsert("a", {"api_key": API_KEY})
    await ConfigRepository(pool, KeyBox([lost])).upsert("b", {"api_key": API_KEY})
    before = await pool.fetch("select api_key_encrypted from ai_module_config order by 1")
    with pytest.raises(DecryptionError):
        await ConfigRepository(pool).rotate_keys(KeyBox([generate_key(), known]))
    assert await pool.fetch("select api_key_encrypted from ai_module_config order by 1") == before


def test_keybox_secret_and_mask() -> None:
    assert mask(API_KEY) == "sk-…WXYZ"
    assert mask("short-key") == "…ey"
    assert mask("abc") == "…"
    secret = Secret(API_KEY)
    assert API_KEY not in repr(secret)
    assert API_KEY not in f"{secret}"
    assert secret.reveal() == API_KEY
    assert secret == Secret(API_KEY)

    disabled = KeyBox.from_setting("  ")
    assert not disabled.enabled
    with pytest.raises(EncryptionDisabledError):
        disabled.encrypt("x")
    with pytest.raises(KeyBoxError, match="key #2 is not a Fernet key") as caught:
        KeyBox.from_setting(f"{generate_key()},not-a-real-key")
    assert "not-a-real-key" not in str(caught.value)


# Merging over the environment defaults


async def test_merge_over_env_defaults(
    pool: Pool, settings: Settings, make_service: Callable[..., Awaitable[DatabaseCommunityConfig]]
) -> None:
    repository = ConfigRepository(pool)
    service = await make_service(pool)
    env = await EnvCommunityConfig(settings).profile("x")

    # No row: exactly the environment's profile.
    assert await service.profile("x") == env

    await repository.upsert("x", {"temperature": 1.2})
    service.invalidate("x")
    merged = await service.profile("x")
    assert merged.temperature == 1.2
    assert merged.max_tokens == settings.ai_max_tokens  # NULL -> env
    assert merged.provider is ProviderName.OLLAMA
    assert merged.fallback_providers == (ProviderName.LOCAL,)
    assert merged.persona == env.persona
    assert merged.trigger_rules == env.trigger_rules
    assert merged.user_cooldown_ms == 10_000
    assert merged.proactive is None

    await repository.upsert("x", {
        "provider": "local", "model": "m-default", "model_by_trigger": {"question": "m-big"},
        "bot_name": "pingu", "max_reply_chars": 120, "triggers": ["question"],
        "event_types": ["raid", "follow"], "user_cooldown_s": 1.5, "channel_cooldown_s": 0,
        "community_rate_limit": 30, "community_rate_window_s": 60,
        "proactive_enabled": True, "proactive_probability": 0.25,
        "allow_links": False, "persist_context": True, "enabled": False,
        "response_prefix": "", "blocked_words": "darn"})
    service.invalidate("x")
    merged = await service.profile("x")
    assert merged.enabled is False
    assert merged.provider is ProviderName.LOCAL
    assert merged.fallback_providers == ()  # the env fallback is now the primary
    assert merged.model_for(Trigger.QUESTION) == "m-big"
    assert merged.model_for("greeting") == "m-default"
    assert merged.persona.bot_name == "pingu"
    assert merged.persona.max_reply_chars == 120
    assert merged.max_reply_chars == 120
    assert merged.trigger_rules.bot_name == "pingu"
    assert merged.trigger_rules.enabled_triggers == frozenset({Trigger.QUESTION})
    assert merged.trigger_rules.answered_events == frozenset(
        {MessageType.RAID, MessageType.FOLLOW})
    assert merged.trigger_rules.known_bots == env.trigger_rules.known_bots
    assert merged.user_cooldown_ms == 1500
    assert merged.channel_cooldown_ms == 0
    assert merged.community_rate_limit == RateLimit(30, 60.0)
    assert merged.user_rate_limit is None
    assert merged.proactive is not None
    assert merged.proactive.probability == 0.25
    assert merged.proactive_enabled
    assert merged.proactive.rate_limit is None
    assert merged.allow_links is False
    assert merged.persist_context is True
    assert merged.response_prefix == ""
    assert merged.blocked_words == ("darn",)
    assert hash(merged) == hash(merged)  # still usable as a dict key


def test_profile_defaults_keep_old_constructors(settings: Settings) -> None:
    env = asyncio.run(EnvCommunityConfig(settings).profile("x"))
    rebuilt = CommunityProfile(
        community_id="x", enabled=True, persona=env.persona, trigger_rules=env.trigger_rules,
        provider=env.provider, fallback_providers=(), model="m", temperature=0.5,
        max_tokens=10, response_prefix="", user_cooldown_ms=0, channel_cooldown_ms=0,
        history_turns=0, max_reply_chars=None, allow_links=True)
    assert rebuilt.model_for(Trigger.EVENT) == "m"
    assert rebuilt.provider_api_key is None
    assert rebuilt.persist_context is False
    record = CommunityConfigRecord(community_id="x", model_by_trigger={"event": "small"})
    assert merge_profile(rebuilt, record).model_for("event") == "small"


# Cache and invalidation


async def test_cache_serves_until_ttl(
    pool: Pool, make_service: Callable[..., Awaitable[DatabaseCommunityConfig]]
) -> None:
    community = unique_community()
    repository = ConfigRepository(pool)
    await repository.upsert(community, {"temperature": 0.1})
    service = await make_service(pool, ttl_s=0.3)
    assert (await service.profile(community)).temperature == 0.1

    await repository.upsert(community, {"temperature": 0.9})
    assert (await service.profile(community)).temperature == 0.1  # cached, nobody told it
    await asyncio.sleep(0.35)
    assert (await service.profile(community)).temperature == 0.9


async def test_concurrent_events_share_one_load(
    pool: Pool, make_service: Callable[..., Awaitable[DatabaseCommunityConfig]]
) -> None:
    service = await make_service(pool)
    profiles = await asyncio.gather(*(service.profile("c") for _ in range(20)))
    assert all(profile is profiles[0] for profile in profiles)


async def test_change_reaches_another_replica_within_a_second(
    pool: Pool, schema_dsn: str,
    make_service: Callable[..., Awaitable[DatabaseCommunityConfig]],
) -> None:
    other_pool = await create_pool(schema_dsn, max_size=2)  # another replica's pool
    try:
        writer = await make_service(pool, listen=True, ttl_s=300)
        reader = await make_service(other_pool, listen=True, ttl_s=300)
        assert writer.listening
        assert reader.listening
        assert (await reader.profile("c")).enabled is True
        assert (await writer.profile("c")).enabled is True

        # Through the repository (what `config set` does) ...
        await ConfigRepository(pool).upsert("c", {"enabled": False})

        async def reader_sees_disabled() -> bool:
            return (await reader.profile("c")).enabled is False

        assert await eventually(reader_sees_disabled, within_s=1.0) < 1.0
        assert (await writer.profile("c")).enabled is False

        # ... by hand in psql ...
        await pool.execute("update ai_module_config set temperature = 1.5 "
                           "where community_id = 'c'")

        async def reader_sees_temperature() -> bool:
            return (await reader.profile("c")).temperature == 1.5

        await eventually(reader_sees_temperature, within_s=1.0)

        # ... and a delete goes back to the environment defaults.
        await pool.execute("delete from ai_module_config")

        async def reader_sees_defaults() -> bool:
            return (await reader.profile("c")).enabled is True

        await eventually(reader_sees_defaults, within_s=1.0)
    finally:
        await other_pool.close()


def test_a_notification_names_the_schema_whose_table_changed() -> None:
    assert notified_community("mine:c1", "mine") == "c1"
    assert notified_community("mine:*", "mine") == ALL_COMMUNITIES
    assert notified_community("theirs:c1", "mine") is None
    # From a replica of the previous version: no schema, taken for ours.
    assert notified_community("c1", "mine") == "c1"
    assert notified_community("*", "mine") == ALL_COMMUNITIES
    assert notified_community("", "mine") == ALL_COMMUNITIES


async def test_another_schemas_changes_do_not_reach_our_cache(
    pool: Pool, make_service: Callable[..., Awaitable[DatabaseCommunityConfig]],
) -> None:
    """NOTIFY channels are the database's: a deployment in another schema of the same
    database notifies on the same channel, and must not make us drop our cache."""
    other_schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(DATABASE_URL)
    await admin.execute(f'create schema "{other_schema}"')
    other_pool = await create_pool(with_search_path(DATABASE_URL, other_schema), max_size=2)
    try:
        await migrate(other_pool)
        ours = await make_service(pool, listen=True, ttl_s=300)
        assert (await ours.profile("c")).enabled is True  # cached
        # Our table changes without a notification (trigger off), so only an
        # invalidation from elsewhere could make us see it.
        async with pool.acquire() as connection:
            await connection.execute(
                "alter table ai_module_config disable trigger ai_module_config_notify")
            await ConfigRepository(pool).upsert("c", {"enabled": False})
            await connection.execute(
                "alter table ai_module_config enable trigger ai_module_config_notify")
        theirs_listening = await asyncpg.connect(with_search_path(DATABASE_URL, other_schema))
        heard: asyncio.Queue[str] = asyncio.Queue()
        await theirs_listening.add_listener(
            CHANNEL, lambda _c, _p, _ch, payload: heard.put_nowait(payload))
        try:
            await ConfigRepository(other_pool).upsert("c", {"temperature": 0.1})
            assert await asyncio.wait_for(heard.get(), 5.0) == f"{other_schema}:c"
            await asyncio.sleep(0.3)  # our listener got the same notification
            assert (await ours.profile("c")).enabled is True  # still the cached config
        finally:
            await theirs_listening.close()
        # A change of our own still reaches us.
        await ConfigRepository(pool).upsert("c", {"temperature": 0.3})

        async def ours_reloaded() -> bool:
            return (await ours.profile("c")).enabled is False

        await eventually(ours_reloaded, within_s=2.0)
    finally:
        await other_pool.close()
        await admin.execute(f'drop schema if exists "{other_schema}" cascade')
        await admin.close()


async def test_database_down_serves_last_known_then_env_defaults(
    schema_dsn: str, settings: Settings,
    make_service: Callable[..., Awaitable[DatabaseCommunityConfig]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    own_pool = await create_pool(schema_dsn, max_size=2)
    await migrate(own_pool)
    await ConfigRepository(own_pool).upsert("known", {"temperature": 0.2})
    service = await make_service(own_pool, ttl_s=0.05, retry_after_s=0.05)
    assert (await service.profile("known")).temperature == 0.2

    await own_pool.close()  # the database is gone for this replica
    await asyncio.sleep(0.1)  # past the TTL: the next event tries to reload
    caplog.set_level(logging.WARNING, logger="config.service")
    for _ in range(3):
        assert (await service.profile("known")).temperature == 0.2
        await asyncio.sleep(0.06)
    unknown = await service.profile("never-loaded")
    assert unknown == await EnvCommunityConfig(settings).profile("never-loaded")
    assert service.health()["status"] == "degraded"

    messages = [record.getMessage() for record in caplog.records]
    assert sum("database unavailable" in message for message in messages) == 1
    assert sum("serving environment defaults" in message for message in messages) == 1


async def test_cold_start_with_unreachable_database_uses_env_defaults(
    settings: Settings, keybox: KeyBox
) -> None:
    dead = "postgresql://postgres:secret@127.0.0.1:1/test"
    assert redact_dsn(dead) == "postgresql://postgres:***@127.0.0.1:1/test"
    dead_pool = await create_pool(dead)
    service = DatabaseCommunityConfig(dead_pool, settings, keybox, listen_dsn=dead,
                                      reconnect_delay_s=0.05)
    try:
        started = time.monotonic()
        await service.start(wait_s=0.2)
        assert not service.listening
        profile = await service.profile("c")
        assert time.monotonic() - started < 2
        assert profile == await EnvCommunityConfig(settings).profile("c")
    finally:
        await service.aclose()
        await dead_pool.close()


async def test_listener_reconnect_clears_the_cache(
    pool: Pool, make_service: Callable[..., Awaitable[DatabaseCommunityConfig]]
) -> None:
    community = unique_community()
    await ConfigRepository(pool).upsert(community, {"max_tokens": 100})
    service = await make_service(pool, listen=True, ttl_s=300)
    assert (await service.profile(community)).max_tokens == 100

    # A change whose notification this replica never gets (triggers off for the session).
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("set local session_replication_role = replica")
        await connection.execute("update ai_module_config set max_tokens = 200")
    await asyncio.sleep(0.2)
    assert (await service.profile(community)).max_tokens == 100  # nobody told it

    old_pid = service.listener_pid
    await pool.execute("select pg_terminate_backend($1)", old_pid)

    async def reconnected() -> bool:
        return service.listening and service.listener_pid not in (None, old_pid)

    await eventually(reconnected, within_s=3.0)
    assert (await service.profile(community)).max_tokens == 200


# Conversation persistence


async def test_turns_are_kept_only_when_the_community_opts_in(pool: Pool) -> None:
    repository = ConfigRepository(pool)
    key = ConversationKey(community_id="c", channel_id="ch", user_id="u", platform="twitch")
    turns = [Turn("user", "hello", speaker="Alice"), Turn("assistant", "hi Alice!")]

    assert await repository.append_turns(key, turns) == 0  # no config row at all
    await repository.upsert("c", {"temperature": 0.5})
    assert await repository.append_turns(key, turns) == 0  # persist_context is off
    assert await pool.fetchval("select count(*) from ai_conversation_context") == 0

    await repository.upsert("c", {"persist_context": True})
    assert await repository.append_turns(key, turns) == 2
    assert await repository.append_turns(key, [Turn("user", "bye", speaker="Alice")]) == 1
    assert await repository.recent_turns(key, 2) == [
        Turn("assistant", "hi Alice!"), Turn("user", "bye", speaker="Alice")]
    other = ConversationKey(community_id="c", channel_id="ch", user_id="v", platform="twitch")
    assert await repository.recent_turns(other, 5) == []

    assert await repository.prune_turns(3600) == 0
    await repository.delete("c")  # forgetting the community forgets its turns
    assert await pool.fetchval("select count(*) from ai_conversation_context") == 0


# What the app and the CLI call


async def test_open_community_config_picks_the_source(
    schema_dsn: str, settings: Settings
) -> None:
    without_db = await open_community_config(Settings(_env_file=None, database_url=None))
    assert isinstance(without_db.source, EnvCommunityConfig)
    assert without_db.health() == {"status": "disabled"}
    await without_db.aclose()

    opened = await open_community_config(settings)  # migrates, then listens
    try:
        assert await applied_versions(schema_dsn) == ALL_MIGRATIONS
        assert opened.health()["status"] == "ok"
        assert opened.pool is not None
        await ConfigRepository(opened.pool).upsert("c", {"max_tokens": 42})
        assert (await opened.source.profile("c")).max_tokens == 42
    finally:
        await opened.aclose()

    started = time.monotonic()
    dead = await open_community_config(
        Settings(_env_file=None, database_url="postgresql://postgres@127.0.0.1:1/test"))
    try:
        assert time.monotonic() - started < 2  # a dead database does not hold the start
        assert dead.health()["status"] == "degraded"
        assert (await dead.source.profile("c")).max_tokens == Settings(
            _env_file=None).ai_max_tokens
    finally:
        await dead.aclose()


async def test_cli_assignments_become_changes(pool: Pool) -> None:
    changes = parse_assignments(
        ["temperature=0.4", "triggers=question,mention", "allow-links=no",
         "model_by_trigger=event=llama3.2:1b", "response_prefix="],
        unset=["model"])
    record = await ConfigRepository(pool).upsert("c", changes)
    assert record.temperature == 0.4
    assert record.triggers == (Trigger.QUESTION, Trigger.MENTION)
    assert record.allow_links is False
    assert record.model_by_trigger == {Trigger.EVENT: "llama3.2:1b"}
    assert record.response_prefix == ""
    assert record.to_display()["temperature"] == 0.4
    with pytest.raises(ValueError, match="argument #1 is not name=value") as caught:
        parse_assignments([API_KEY])
    assert API_KEY not in str(caught.value)


def test_greeting_and_farewell_words_are_optional_per_community_fields(
    settings: Settings,
) -> None:
    record = CommunityConfigRecord(community_id="x", greeting_words="ahoy, ^waddle on",
                                   farewell_words="fair winds")
    assert record.greeting_words == ("ahoy", "^waddle on")
    assert record.farewell_words == ("fair winds",)
    with pytest.raises(ValidationError):
        CommunityConfigRecord(community_id="x", greeting_words=["^"])
    env = asyncio.run(EnvCommunityConfig(settings).profile("x"))
    merged = merge_profile(env, record)
    assert merged.trigger_rules.greeting_words == ("ahoy", "^waddle on")
    assert merged.trigger_rules.bot_name == env.trigger_rules.bot_name
    # Not set: the built-in lists.
    plain = merge_profile(env, CommunityConfigRecord(community_id="x", triggers="greeting"))
    assert plain.trigger_rules.greeting_words == env.trigger_rules.greeting_words


async def test_trigger_words_are_stored_and_cleared(pool: Pool, keybox: KeyBox) -> None:
    repository = ConfigRepository(pool, keybox)
    saved = await repository.upsert("penguins", {"greeting_words": "ahoy,good morning",
                                                 "farewell_words": ""})
    assert saved.greeting_words == ("ahoy", "good morning")
    assert saved.farewell_words == ()  # an empty list: no farewells by words
    cleared = await repository.upsert("penguins", {"greeting_words": None})
    assert cleared.greeting_words is None
