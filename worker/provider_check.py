"""From outside a worker (the CLI): are the configured providers answering?

`waddle-ai dlq replay` runs in its own process, so it cannot see a worker's
circuit breakers. It asks the providers itself, with the very probe the
workers' circuits use (`providers.probe.probe`): a provider that does not
answer the CLI is one whose circuit is open, or about to open, in the
workers. The operator is told which one, at which address, and that the
replayed events will wait for it (refusals by open circuits do not spend
their retries) rather than bounce back into the DLQ.

Only the environment's providers (`AI_PROVIDER`, `AI_FALLBACK_PROVIDERS`)
are asked; communities' own endpoints are not. The embedded model is not
asked either: it runs inside each worker, and is there whenever they are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from config.settings import Settings
from domain.provider_names import ProviderName
from providers.base import Provider
from providers.errors import ProviderError
from providers.factory import build_provider
from providers.probe import probe


@dataclass(frozen=True, slots=True)
class Unreachable:
    provider: str
    address: str
    error: ProviderError

    def sentence(self) -> str:
        return (f"{self.provider} ({self.address}) is not answering ({self.error.detail}): "
                "replayed events will wait until it does")


def provider_address(settings: Settings, name: ProviderName) -> str:
    return {
        ProviderName.OLLAMA: settings.ollama_base_url,
        ProviderName.WADDLEAI: settings.waddleai_base_url,
        ProviderName.LOCAL: "the embedded model",
    }[name]


async def unreachable_providers(settings: Settings) -> list[Unreachable]:
    """The configured HTTP providers whose health endpoint does not answer, in chain order."""
    names = [n for n in (settings.ai_provider, *settings.ai_fallback_providers)
             if n is not ProviderName.LOCAL]
    providers: list[tuple[ProviderName, Provider]] = [
        (name, build_provider(name, settings)) for name in names]
    try:
        errors = await asyncio.gather(*(probe(provider) for _, provider in providers))
    finally:
        for _, provider in providers:
            await provider.aclose()
    return [
        Unreachable(name.value, provider_address(settings, name), error)
        for (name, _), error in zip(providers, errors, strict=True) if error is not None
    ]
