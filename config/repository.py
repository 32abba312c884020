"""Reading and writing per-community settings (`ai_module_config`) and kept turns.

Validation happens twice on purpose: `CommunityConfigRecord` gives the CLI a
clear message per field before anything is written, and the table's CHECK
constraints stop whatever gets past it (a hand-written `UPDATE` in psql).

Writes are partial: `upsert` changes the named fields only, inside a
transaction that locks the row, so two operators changing different fields of
one community at once both win, and the combination is validated as a whole
(a rate limit needs its window, a fallback provider must differ from the
primary). A plain API key given to `upsert` is encrypted before it leaves the
process; the plain text is never stored, returned or logged.
"""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from config.database import CheckViolationError, Pool, Record
from config.secrets import KeyBox, KeyBoxError
from domain.conversation import ConversationKey, Turn
from domain.provider_names import ProviderName
from domain.secret import mask
from domain.triggers import EVENT_TYPES
from schemas.errors import WaddleError
from schemas.events import MessageType
from schemas.replies import Trigger

log = logging.getLogger(__name__)

TABLE: Final = "ai_module_config"
CONTEXT_TABLE: Final = "ai_conversation_context"
MAX_API_KEY_CHARS: Final = 4096

ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
Word = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class ConfigValidationError(WaddleError, ValueError):
    """A change that would make a community's config invalid; names every bad field."""

    def __init__(self, community_id: str, problems: Sequence[str]) -> None:
        self.community_id = community_id
        self.problems = list(problems)
        super().__init__(
            f"invalid config for community {community_id!r}: " + "; ".join(self.problems)
        )


def _csv(value: Any) -> Any:
    """The CLI passes `a,b,c`; code passes a list. Both mean the same list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _unique(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


class CommunityConfigRecord(BaseModel):
    """One row of `ai_module_config`; `None` in a field means "the environment's default"."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    community_id: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    enabled: bool = True

    provider: ProviderName | None = None
    fallback_providers: tuple[ProviderName, ...] | None = None
    model: ModelName | None = None
    model_by_trigger: dict[Trigger, ModelName] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    base_url: str | None = None
    api_key_encrypted: str | None = Field(default=None, repr=False)

    system_prompt: str | None = Field(default=None, min_length=1, max_length=20000)
    bot_name: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)
    ] | None = None
    response_prefix: str | None = Field(default=None, max_length=32)
    max_reply_chars: int | None = Field(default=None, ge=1, le=10000)
    allow_links: bool | None = None
    blocked_words: tuple[Word, ...] | None = Field(default=None, max_length=1000)

    triggers: tuple[Trigger, ...] | None = None
    event_types: tuple[MessageType, ...] | None = None
    # Replace the built-in lists (domain/triggers.py); "^word": first word only.
    greeting_words: tuple[Word, ...] | None = Field(default=None, max_length=500)
    farewell_words: tuple[Word, ...] | None = Field(default=None, max_length=500)

    user_cooldown_s: float | None = Field(default=None, ge=0, le=86400)
    channel_cooldown_s: float | None = Field(default=None, ge=0, le=86400)
    user_rate_limit: int | None = Field(default=None, ge=1, le=100_000)
    user_rate_window_s: int | None = Field(default=None, ge=1, le=86400)
    community_rate_limit: int | None = Field(default=None, ge=1, le=1_000_000)
    community_rate_window_s: int | None = Field(default=None, ge=1, le=86400)

    proactive_enabled: bool = False
    proactive_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    proactive_min_length: int | None = Field(default=None, ge=0, le=10000)
    proactive_rate_limit: int | None = Field(default=None, ge=1, le=100_000)
    proactive_rate_window_s: int | None = Field(default=None, ge=1, le=86400)

    persist_context: bool = False

    created_at: datetime | None = None
    updated_at: datetime | None = None

    _split = field_validator(
        "fallback_providers", "blocked_words", "triggers", "event_types", "greeting_words",
        "farewell_words", mode="before"
    )(_csv)

    @field_validator("fallback_providers", "triggers", "event_types", "blocked_words",
                     "greeting_words", "farewell_words")
    @classmethod
    def _dedupe(cls, value: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        return None if value is None else _unique(value)

    @field_validator("greeting_words", "farewell_words")
    @classmethod
    def _words_with_something_to_match(
        cls, value: tuple[str, ...] | None
    ) -> tuple[str, ...] | None:
        if value is not None:
            for word in value:
                if not word.lstrip("^").strip():
                    raise ValueError(f"{word!r} has nothing to match")
        return value

    @field_validator("event_types")
    @classmethod
    def _only_events(
        cls, value: tuple[MessageType, ...] | None
    ) -> tuple[MessageType, ...] | None:
        if value is not None and MessageType.CHAT_MESSAGE in value:
            allowed = ", ".join(sorted(t.value for t in EVENT_TYPES))
            raise ValueError(
                f"chatMessage is not an event type (chat lines are governed by triggers); "
                f"allowed: {allowed}"
            )
        return value

    @field_validator("model_by_trigger", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        """JSON from code or psql, `question=llama3.1:8b,event=llama3.2:1b` from the CLI."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON object: {exc.msg}") from None
            pairs: dict[str, str] = {}
            for part in _csv(text):
                trigger, sep, model = part.partition("=")
                if not sep:
                    raise ValueError("expected trigger=model pairs, e.g. question=llama3.1:8b")
                pairs[trigger.strip()] = model.strip()
            return pairs
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = value.strip()
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not contain credentials; set api_key instead")
        if any(char.isspace() for char in url):
            raise ValueError("must not contain whitespace")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _coherent(self) -> CommunityConfigRecord:
        for name in ("user", "community", "proactive"):
            limit = getattr(self, f"{name}_rate_limit")
            window = getattr(self, f"{name}_rate_window_s")
            if (limit is None) != (window is None):
                raise ValueError(
                    f"{name}_rate_limit and {name}_rate_window_s are set together "
                    "(or cleared together)"
                )
        if self.provider is not None and self.provider in (self.fallback_providers or ()):
            raise ValueError(
                f"fallback_providers must not repeat provider ({self.provider.value})"
            )
        return self

    def to_display(self, keybox: KeyBox | None = None) -> dict[str, Any]:
        """What `config get` prints: set fields only, the provider key masked, never plain."""
        shown: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json", exclude={"api_key_encrypted"}).items():
            if value is not None:
                shown[name] = value
        if self.api_key_encrypted is not None:
            shown["api_key"] = _masked_key(self.api_key_encrypted, keybox)
        return shown


def _masked_key(token: str, keybox: KeyBox | None) -> str:
    if keybox is None or not keybox.enabled:
        return "<encrypted; CONFIG_ENCRYPTION_KEY not set>"
    try:
        return mask(keybox.decrypt(token))
    except KeyBoxError:
        return "<encrypted with an unknown key>"


# Fields `upsert` accepts, plus `api_key` (plain text, encrypted before storing).
_READ_ONLY: Final = frozenset({"community_id", "api_key_encrypted", "created_at", "updated_at"})
SETTABLE_FIELDS: Final[tuple[str, ...]] = (
    *(name for name in CommunityConfigRecord.model_fields if name not in _READ_ONLY),
    "api_key",
)
# NOT NULL columns: clearing them means going back to the column default.
_NOT_NULL_DEFAULTS: Final[Mapping[str, Any]] = {
    "enabled": True,
    "proactive_enabled": False,
    "persist_context": False,
}
_REAL_COLUMNS: Final = frozenset({
    "temperature", "user_cooldown_s", "channel_cooldown_s", "proactive_probability"})


def _from_real(value: float) -> float:
    """A `real` comes back as 0.699999988 for 0.7: show what was written."""
    return float(f"{value:.7g}")


def record_from_row(row: Record) -> CommunityConfigRecord:
    data = dict(row)
    for name in _REAL_COLUMNS:
        if data.get(name) is not None:
            data[name] = _from_real(data[name])
    if isinstance(data.get("model_by_trigger"), str):
        data["model_by_trigger"] = json.loads(data["model_by_trigger"])
    return CommunityConfigRecord.model_validate(data)


def _to_column(name: str, record: CommunityConfigRecord) -> Any:
    value = getattr(record, name)
    if value is None:
        return None
    if name == "model_by_trigger":
        return json.dumps({str(key): model for key, model in value.items()}, sort_keys=True)
    if isinstance(value, tuple):
        return [str(item) for item in value]
    if isinstance(value, ProviderName):
        return value.value
    return value


_SECRET_FIELDS: Final = frozenset({"api_key", "api_key_encrypted"})


def _problems(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        shown = error.get("input")
        if where not in _SECRET_FIELDS and isinstance(shown, str | int | float) and error["loc"]:
            message += f" (got {shown!r})"
        problems.append(f"{where}: {message}")
    return problems


def parse_assignments(
    assignments: Sequence[str], unset: Sequence[str] = ()
) -> dict[str, Any]:
    """`config set C temperature=0.4 triggers=question,mention --unset model` -> changes.

    Values stay strings: `CommunityConfigRecord` converts them (numbers, booleans,
    comma lists, `trigger=model` pairs), so the CLI and code share one set of
    rules and messages. `key=` is an empty value (an empty list, no prefix),
    not a clear: clearing is `--unset key`.
    """
    changes: dict[str, Any] = {}
    for position, assignment in enumerate(assignments, start=1):
        name, sep, value = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            # Not echoed: a pasted API key without `api_key=` must not reach the terminal log.
            raise ValueError(f"argument #{position} is not name=value")
        changes[name] = value
    for name in unset:
        changes[name.strip().replace("-", "_")] = None
    return changes


class ConfigRepository:
    """`ai_module_config` and `ai_conversation_context` in the pool's current schema."""

    def __init__(self, pool: Pool, keybox: KeyBox | None = None) -> None:
        self._pool = pool
        self._keybox = keybox or KeyBox.disabled()

    async def get(self, community_id: str) -> CommunityConfigRecord | None:
        row = await self._pool.fetchrow(
            f"select * from {TABLE} where community_id = $1", community_id)
        return None if row is None else record_from_row(row)

    async def list(self) -> builtins.list[CommunityConfigRecord]:
        rows = await self._pool.fetch(f"select * from {TABLE} order by community_id")
        return [record_from_row(row) for row in rows]

    async def upsert(
        self, community_id: str, changes: Mapping[str, Any]
    ) -> CommunityConfigRecord:
        """Change the named fields only (`None` clears one back to the environment default)."""
        unknown = sorted(set(changes) - set(SETTABLE_FIELDS))
        if unknown:
            raise ConfigValidationError(community_id, [
                f"{name}: unknown setting (known: {', '.join(SETTABLE_FIELDS)})"
                for name in unknown])
        values = dict(changes)
        if "api_key" in values:
            values["api_key_encrypted"] = self._encrypt_api_key(community_id, values.pop("api_key"))
        for name, default in _NOT_NULL_DEFAULTS.items():
            if name in values and values[name] is None:
                values[name] = default

        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                f"select * from {TABLE} where community_id = $1 for update", community_id)
            current = (record_from_row(row) if row is not None
                       else CommunityConfigRecord(community_id=community_id))
            data = current.model_dump(exclude={"created_at", "updated_at"})
            data.update(values)
            try:
                merged = CommunityConfigRecord.model_validate(data)
            except ValidationError as exc:
                raise ConfigValidationError(community_id, _problems(exc)) from None

            columns = sorted(values)
            params = [community_id, *(_to_column(name, merged) for name in columns)]
            names = ", ".join(["community_id", *columns])
            slots = ", ".join(f"${i}" for i in range(1, len(params) + 1))
            updates = ", ".join(f"{name} = excluded.{name}" for name in columns)
            conflict = f"do update set {updates}" if columns else (
                "do update set updated_at = now()")
            try:
                saved = await connection.fetchrow(
                    f"insert into {TABLE} ({names}) values ({slots}) "
                    f"on conflict (community_id) {conflict} returning *",
                    *params,
                )
            except CheckViolationError as exc:
                constraint = getattr(exc, "constraint_name", None) or "a check constraint"
                raise ConfigValidationError(
                    community_id, [f"the database refused the change ({constraint})"]
                ) from None
        assert saved is not None
        log.info("community config changed", extra={
            "action": "config_set", "community": community_id, "category": "audit",
            "fields": ["api_key" if name == "api_key_encrypted" else name for name in columns]})
        return record_from_row(saved)

    def _encrypt_api_key(self, community_id: str, plain: Any) -> str | None:
        if plain is None:
            return None
        if not isinstance(plain, str) or not plain.strip():
            raise ConfigValidationError(community_id, ["api_key: must be a non-empty string"])
        key = plain.strip()
        if len(key) > MAX_API_KEY_CHARS or any(char.isspace() for char in key):
            raise ConfigValidationError(
                community_id,
                [f"api_key: must be one word of at most {MAX_API_KEY_CHARS} characters"])
        return self._keybox.encrypt(key)

    async def delete(self, community_id: str) -> bool:
        """Forget a community's config (it goes back to the environment defaults)."""
        status = await self._pool.execute(
            f"delete from {TABLE} where community_id = $1", community_id)
        deleted = status.endswith(" 1")
        if deleted:
            log.info("community config deleted", extra={
                "action": "config_delete", "community": community_id, "category": "audit"})
        return deleted

    async def rotate_keys(self, keybox: KeyBox) -> int:
        """Re-encrypt every stored provider key with `keybox`'s newest key, all or nothing.

        A token no configured key can decrypt aborts the whole rotation (and
        changes nothing): dropping the old key afterwards would lose that key.
        """
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                f"select community_id, api_key_encrypted from {TABLE} "
                "where api_key_encrypted is not null order by community_id for update")
            for row in rows:
                token = keybox.rotate(row["api_key_encrypted"])
                await connection.execute(
                    f"update {TABLE} set api_key_encrypted = $2 where community_id = $1",
                    row["community_id"], token)
        log.info("provider keys re-encrypted with the newest key", extra={
            "action": "config_rotate_key", "category": "audit", "count": len(rows)})
        return len(rows)

    # Conversation persistence (opt-in per community).

    async def append_turns(self, key: ConversationKey, turns: Sequence[Turn]) -> int:
        """Keep `turns` if, and only if, the community has `persist_context` on.

        The flag is checked in the same statement as the insert, so a caller
        working from a stale profile still cannot store text for a community
        that switched persistence off. Returns how many turns were kept.
        """
        if not turns:
            return 0
        status = await self._pool.execute(
            f"""
            insert into {CONTEXT_TABLE}
                (community_id, platform, channel_id, user_id, role, speaker, content)
            select $1, $2, $3, $4, turn.role, turn.speaker, turn.content
            from unnest($5::text[], $6::text[], $7::text[])
                with ordinality as turn(role, speaker, content, position)
            where exists (
                select 1 from {TABLE} where community_id = $1 and persist_context
            )
            order by turn.position
            """,
            key.community_id, key.platform, key.channel_id, key.user_id,
            [turn.role for turn in turns], [turn.speaker for turn in turns],
            [turn.content for turn in turns],
        )
        return int(status.rsplit(" ", 1)[-1])

    async def recent_turns(self, key: ConversationKey, limit: int) -> builtins.list[Turn]:
        """The last `limit` kept turns of one conversation, oldest first."""
        if limit <= 0:
            return []
        rows = await self._pool.fetch(
            f"""
            select role, speaker, content from {CONTEXT_TABLE}
            where community_id = $1 and platform = $2 and channel_id = $3 and user_id = $4
            order by created_at desc, id desc
            limit $5
            """,
            key.community_id, key.platform, key.channel_id, key.user_id, limit,
        )
        return [Turn(role=row["role"], content=row["content"], speaker=row["speaker"])
                for row in reversed(rows)]

    async def forget_turns(self, community_id: str) -> int:
        """Erase every kept turn of a community (e.g. after it switched persistence off)."""
        status = await self._pool.execute(
            f"delete from {CONTEXT_TABLE} where community_id = $1", community_id)
        return int(status.rsplit(" ", 1)[-1])

    async def prune_turns(self, older_than_s: float) -> int:
        """Retention: erase kept turns older than `older_than_s` seconds."""
        status = await self._pool.execute(
            f"delete from {CONTEXT_TABLE} "
            "where created_at < now() - make_interval(secs => $1)", float(older_than_s))
        return int(status.rsplit(" ", 1)[-1])


__all__ = [
    "SETTABLE_FIELDS",
    "CommunityConfigRecord",
    "ConfigRepository",
    "ConfigValidationError",
    "parse_assignments",
    "record_from_row",
]
