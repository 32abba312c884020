"""Choose which provider answers: the community's primary, then its fallbacks.

A retryable failure of one provider moves on to the next in the chain; a
request the backend refuses (`ProviderBadRequest`) is not sent elsewhere,
since the next backend would most likely refuse it too and the event belongs
in the DLQ. The error of the last provider tried is raised when none answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from config.settings import ProviderName
from providers.base import ChatRequest, Completion, Provider, collect
from providers.errors import ProviderError
from worker.metrics import Metrics

log = logging.getLogger(__name__)


class ProviderRouter:
    def __init__(self, providers: Mapping[ProviderName, Provider], metrics: Metrics) -> None:
        self._providers = dict(providers)
        self._metrics = metrics

    @property
    def providers(self) -> Mapping[ProviderName, Provider]:
        return self._providers

    def get(self, name: ProviderName) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise LookupError(
                f"provider {name.value!r} is not configured in this worker "
                f"(configured: {', '.join(p.value for p in self._providers)})"
            ) from None

    async def complete(
        self, chain: Sequence[ProviderName], request: ChatRequest
    ) -> Completion:
        """Stream the answer from the first provider in `chain` that gives one."""
        if not chain:
            raise ValueError("no provider to ask")
        last_error: ProviderError | None = None
        for position, name in enumerate(chain):
            provider = self.get(name)
            started = time.perf_counter()
            try:
                completion = await collect(
                    provider, request if position == 0 else _without_model(request))
            except ProviderError as exc:
                self._metrics.provider_errors.labels(provider.name, exc.error_type).inc()
                last_error = exc
                if not exc.retryable:
                    raise
                log.warning("provider failed", extra={
                    "action": "provider_call", "provider": provider.name,
                    "error_type": exc.error_type, "error": str(exc)})
                continue
            self._metrics.provider_latency.labels(provider.name).observe(
                time.perf_counter() - started)
            return completion
        assert last_error is not None
        raise last_error

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()


def _without_model(request: ChatRequest) -> ChatRequest:
    """A community's model name belongs to its primary provider; fallbacks use their own."""
    return ChatRequest(
        messages=request.messages, temperature=request.temperature,
        max_tokens=request.max_tokens, model=None,
    )
