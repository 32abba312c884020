"""Build the configured provider by name.

The embedded model is the exception: loading it is slow and must happen once
per process, so the caller loads it (`LocalModel.aload_from_settings`) and
passes it in, and keeps ownership of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from config.settings import Settings
from domain.provider_names import ProviderName
from providers.base import Provider
from providers.local import LocalModel, LocalProvider
from providers.ollama import OllamaProvider
from providers.openai_compat import OpenAICompatProvider


def build_provider(
    name: ProviderName, settings: Settings, *, local_model: LocalModel | None = None
) -> Provider:
    """A ready provider; no request is made until it is first used."""
    match name:
        case ProviderName.OLLAMA:
            return OllamaProvider.from_settings(settings)
        case ProviderName.WADDLEAI:
            return OpenAICompatProvider.from_settings(settings)
        case ProviderName.LOCAL:
            if local_model is None:
                raise ValueError(
                    "provider 'local' needs the embedded model loaded first: "
                    "pass local_model=await LocalModel.aload_from_settings(settings)"
                )
            return LocalProvider(local_model, timeout_s=settings.local_timeout)
    raise ValueError(f"unknown provider {name!r}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A community's own address or key for a kind of provider.

    Endpoints are pooled by this identity, so communities that share an
    address and key share one HTTP client and one circuit breaker. The key
    itself is never part of it: only its fingerprint is.
    """

    kind: ProviderName
    base_url: str | None
    key_fingerprint: str | None

    @classmethod
    def of(cls, kind: ProviderName, base_url: str | None, api_key: str | None) -> Endpoint:
        fingerprint = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else None
        return cls(kind, base_url.rstrip("/") if base_url else None, fingerprint)

    def __str__(self) -> str:
        return f"{self.kind.value}@{self.base_url or 'default'}"


def build_endpoint_provider(
    kind: ProviderName, settings: Settings, *, base_url: str | None, api_key: str | None
) -> Provider:
    """A provider for a community's own endpoint.

    A community's base URL never gets the environment's API key: the key goes
    only where the operator configured it, or with the community's own key.
    """
    match kind:
        case ProviderName.OLLAMA:
            if base_url is None:
                return OllamaProvider.from_settings(settings)
            return OllamaProvider(
                base_url=base_url, model=settings.ollama_model, timeout_s=settings.ollama_timeout,
                keep_alive=settings.ollama_keep_alive_value, think=settings.ollama_think,
            )
        case ProviderName.WADDLEAI:
            return OpenAICompatProvider(
                base_url=base_url or settings.waddleai_base_url,
                api_key=api_key if (api_key or base_url) else settings.waddleai_api_key,
                model=settings.waddleai_model,
                preferred_model=settings.waddleai_preferred_model,
                timeout_s=settings.waddleai_timeout,
            )
        case ProviderName.LOCAL:
            raise ValueError("the local provider has no endpoint to configure")
    raise ValueError(f"unknown provider {kind!r}")
