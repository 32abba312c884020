"""Build the configured provider by name.

The embedded model is the exception: loading it is slow and must happen once
per process, so the caller loads it (`LocalModel.aload_from_settings`) and
passes it in, and keeps ownership of it.
"""

from __future__ import annotations

from config.settings import ProviderName, Settings
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
