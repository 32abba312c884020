"""Process settings from the environment (and an optional `.env`).

Every variable of the contract's table lives here with the contract's default,
so a developer's machine needs none of them. Values are validated once at
start: a bad value stops the process with a message that names the variable,
rather than failing on the first event an hour later.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from config.ollama_env import (
    DEFAULT_PORT,
    ThinkValue,
    parse_keep_alive,
    parse_ollama_host,
    parse_think,
)
from domain.provider_names import ProviderName
from schemas.errors import WaddleError

DEFAULT_SYSTEM_PROMPT = (
    "You are {bot_name}, the friendly, upbeat chat bot of a live-streaming community. "
    "You answer viewers in chat: short, warm, on topic, one or two sentences, "
    "no markdown, no links unless asked, never rude, never political."
)


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


def _split_csv(value: Any) -> Any:
    """Accept `a,b,c` from the environment as well as a real list from code."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class SettingsError(WaddleError, ValueError):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    """The worker's settings. Field `foo_bar` is read from `FOO_BAR`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        frozen=True,
    )

    # Broker and names
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    queue_prefix: str = Field(
        default="ai", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$"
    )

    # State
    redis_url: str | None = None
    database_url: str | None = None

    # Providers
    ai_provider: ProviderName = ProviderName.LOCAL
    ai_fallback_providers: Annotated[list[ProviderName], NoDecode] = Field(default_factory=list)

    ollama_host: str = "localhost"
    ollama_port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    ollama_use_tls: bool = False
    ollama_cert_path: str | None = None
    ollama_verify_ssl: bool = True
    ollama_model: str = "llama3.2"
    ollama_timeout: float = Field(default=30.0, gt=0, le=600)
    ollama_keep_alive: str = "30m"
    # Sent as Ollama's `think`: a thinking model left to its default spends the
    # whole token budget on reasoning and answers nothing.
    ollama_think: ThinkValue = False

    waddleai_base_url: str = "http://waddleai-proxy:8000"
    waddleai_api_key: str | None = None
    waddleai_model: str = "auto"
    waddleai_preferred_model: str | None = None
    waddleai_timeout: float = Field(default=30.0, gt=0, le=600)

    local_model_path: str | None = None
    local_parallel: int = Field(default=4, ge=1, le=64)
    local_context_tokens: int = Field(default=2048, ge=256, le=32768)
    local_threads: int = Field(default=0, ge=0, le=256)
    local_timeout: float = Field(default=60.0, gt=0, le=600)

    # Persona defaults for communities without their own config
    ai_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    ai_max_tokens: int = Field(default=500, ge=1, le=32768)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    bot_name: str = Field(default="waddlebot", min_length=1, max_length=64)
    response_prefix: str = "🤖 "
    known_bots: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "nightbot", "streamelements", "streamlabs", "moobot", "fossabot",
            "wizebot", "botrixoficial", "sery_bot", "soundalerts",
        ]
    )

    # Triggers and conversation memory
    user_cooldown_s: float = Field(default=10.0, ge=0, le=86400)
    channel_cooldown_s: float = Field(default=2.0, ge=0, le=86400)
    history_turns: int = Field(default=6, ge=0, le=100)
    history_ttl_s: int = Field(default=3600, ge=1, le=30 * 86400)
    memory_max_conversations: int = Field(default=10_000, ge=10, le=10_000_000)
    dedupe_ttl_s: int = Field(default=86400, ge=60, le=30 * 86400)
    # How long each event's outcome (replied, or why not) is kept for `waddle-ai explain`.
    outcome_ttl_s: int = Field(default=600, ge=1, le=7 * 86400)

    # Throughput and reliability
    max_concurrent_requests: int = Field(default=64, ge=1, le=100_000)
    prefetch_count: int = Field(default=64, ge=1, le=65535)
    retry_delays_ms: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1000, 2000, 4000, 8000, 16000]
    )
    delivery_limit: int = Field(default=10, ge=1, le=1000)
    # Circuit breaker per provider: this many consecutive failures skip it for CIRCUIT_OPEN_S.
    circuit_failure_threshold: int = Field(default=5, ge=1, le=1000)
    circuit_open_s: float = Field(default=60.0, gt=0, le=3600)
    # While a circuit is open, its provider's health endpoint is asked this often
    # (jittered) and the circuit closes at the first answer; 0: no probes.
    circuit_probe_s: float = Field(default=2.0, ge=0, le=3600)
    max_event_age_s: float = Field(default=120.0, gt=0)
    shutdown_grace_s: float = Field(default=25.0, ge=0, le=3600)

    # Sidecar and API
    sidecar_host: str = "0.0.0.0"
    sidecar_port: int = Field(default=8005, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Completions answered at once per worker and transport: over HTTP more get
    # 429 with Retry-After; over AMQP it is the RPC queue's prefetch.
    completions_max_concurrent: int = Field(default=32, ge=1, le=10_000)
    config_encryption_key: str | None = None

    # Test-only fault injection: a worker that receives a body containing this
    # text dies on the spot (os._exit), as a crash would. Never set in production.
    waddle_test_crash_marker: str | None = None
    # Test-only as well: once the broker confirms the reply to an event whose id
    # contains this text, the worker dies before marking the event answered
    # (publishers/crash_hook.py). Never set in production.
    waddle_test_crash_after_confirm: str | None = None

    # Keys the hash that stands for user ids in logs; replicas sharing it log the
    # same hash for the same viewer. Unset: a random key per process.
    log_hash_key: str | None = None
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.JSON

    _csv = field_validator(
        "ai_fallback_providers", "known_bots", "retry_delays_ms", "api_keys", mode="before"
    )(_split_csv)

    @field_validator("retry_delays_ms")
    @classmethod
    def _delays_positive_and_distinct(cls, value: list[int]) -> list[int]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every delay must be a positive number of milliseconds")
        if len(set(value)) != len(value):
            raise ValueError("delays must be distinct: each one is its own delay queue")
        return value

    @field_validator("ollama_host")
    @classmethod
    def _ollama_host_readable(cls, value: str) -> str:
        parse_ollama_host(value)  # ValueError names what is wrong; the loc names the variable
        return value

    @field_validator("ollama_keep_alive")
    @classmethod
    def _ollama_keep_alive_readable(cls, value: str) -> str:
        parse_keep_alive(value)
        return value

    @field_validator("ollama_think", mode="before")
    @classmethod
    def _ollama_think_readable(cls, value: Any) -> ThinkValue:
        return parse_think(value)

    @field_validator("known_bots")
    @classmethod
    def _lower_bots(cls, value: list[str]) -> list[str]:
        return [name.lower().lstrip("@") for name in value]

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("redis_url", "database_url", "ollama_cert_path", "waddleai_api_key",
                     "waddleai_preferred_model", "config_encryption_key", "local_model_path",
                     "log_hash_key",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _fallbacks_differ_from_primary(self) -> Settings:
        if self.ai_provider in self.ai_fallback_providers:
            raise ValueError(
                "AI_FALLBACK_PROVIDERS must not repeat AI_PROVIDER "
                f"({self.ai_provider.value})"
            )
        return self

    @model_validator(mode="after")
    def _ollama_address_agrees(self) -> Settings:
        """OLLAMA_PORT and OLLAMA_USE_TLS fill in what OLLAMA_HOST leaves open, never override it.

        Set explicitly and contradicting the host (another port, another
        scheme), one of them is a mistake: which one is for the operator to say.
        """
        address = parse_ollama_host(self.ollama_host)
        explicit = self.model_fields_set
        if (address.port is not None and "ollama_port" in explicit
                and address.port != self.ollama_port):
            raise ValueError(
                f"OLLAMA_HOST names port {address.port} but OLLAMA_PORT is {self.ollama_port}: "
                "set the port in one of them only (or the same port in both)")
        if address.scheme is not None and "ollama_use_tls" in explicit and (
                (address.scheme == "https") != self.ollama_use_tls):
            raise ValueError(
                f"OLLAMA_HOST says {address.scheme}:// but OLLAMA_USE_TLS is "
                f"{str(self.ollama_use_tls).lower()}: set the scheme in one of them only")
        return self

    @property
    def ollama_base_url(self) -> str:
        """The base URL from `OLLAMA_HOST` in any form Ollama accepts (`config.ollama_env`)."""
        address = parse_ollama_host(self.ollama_host)
        port_set = "ollama_port" in self.model_fields_set or self.ollama_port != DEFAULT_PORT
        return address.url(port=self.ollama_port if port_set else None,
                           use_tls=self.ollama_use_tls)

    @property
    def ollama_keep_alive_value(self) -> str | int:
        """`keep_alive` as Ollama's API takes it: seconds as a JSON number, else a duration."""
        return parse_keep_alive(self.ollama_keep_alive)

    @property
    def redis_key_prefix(self) -> str:
        """Redis keys share the queue prefix, so one setting separates two deployments."""
        return f"{self.queue_prefix}:"


def _is_secret(name: str) -> bool:
    return any(word in name for word in ("KEY", "PASSWORD", "URL"))


def load_settings(**overrides: Any) -> Settings:
    """Read settings, turning pydantic's error into one that names the variables."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:
                # A rule across several variables: its input is every setting,
                # API keys included, so only the message (which names them) is shown.
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            name = "_".join(str(part) for part in error["loc"]).upper()
            shown = "***" if _is_secret(name) else repr(error.get("input"))
            problems.append(f"{name}: {error['msg']} (got {shown})")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
