"""The AI providers a worker or a community can name.

A leaf: settings, community profiles, the providers and the HTTP layer all
speak of providers by these names, so the names live below all of them.
"""

from __future__ import annotations

from enum import StrEnum


class ProviderName(StrEnum):
    LOCAL = "local"
    OLLAMA = "ollama"
    WADDLEAI = "waddleai"
