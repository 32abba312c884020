"""Choose which provider answers: the community's primary, then its fallbacks.

A retryable failure of one provider moves on to the next in the chain; a
request the backend refuses (`ProviderBadRequest`) is not sent elsewhere,
since the next backend would most likely refuse it too and the event belongs
in the DLQ. The error of the last provider tried is raised when none answers.

Each provider has a circuit breaker (`providers.breaker`): while a provider's
circuit is open it is skipped without a request, as if it had failed with
`ProviderUnavailable("circuit open")` (a `CircuitOpen`). So a dead primary
costs each event nothing instead of a full timeout, and when every circuit of
the chain is open the event goes straight back to the retry delay queues,
with `retry_after_s` saying when the first circuit lets a probe through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from config.settings import ProviderName
from providers.base import ChatRequest, Completion, Provider, collect
from providers.breaker import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_OPEN_S,
    CircuitBreaker,
    CircuitOpen,
    Clock,
)
from providers.errors import ProviderError
from worker.metrics import Metrics

log = logging.getLogger(__name__)


class ProviderRouter:
    def __init__(
        self,
        providers: Mapping[ProviderName, Provider],
        metrics: Metrics,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        open_s: float = DEFAULT_OPEN_S,
        clock: Clock = time.monotonic,
    ) -> None:
        self._providers = dict(providers)
        self._metrics = metrics
        self._breakers = {
            name: CircuitBreaker(
                provider.name, failure_threshold=failure_threshold, open_s=open_s,
                clock=clock, metrics=metrics,
            )
            for name, provider in self._providers.items()
        }

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

    def breaker(self, name: ProviderName) -> CircuitBreaker:
        self.get(name)  # the same LookupError for an unknown name
        return self._breakers[name]

    def breaker_state(self, name: ProviderName) -> str:
        """`closed`, `half_open` or `open`, for /readyz."""
        return self.breaker(name).state.label

    async def complete(
        self, chain: Sequence[ProviderName], request: ChatRequest
    ) -> Completion:
        """Stream the answer from the first provider in `chain` that gives one."""
        if not chain:
            raise ValueError("no provider to ask")
        last_error: ProviderError | None = None
        waits: list[float] = []
        for position, name in enumerate(chain):
            provider = self.get(name)
            breaker = self._breakers[name]
            ticket = breaker.allow()
            if ticket is None:
                # Debug only: while a circuit is open this happens on every
                # event, and the transition itself was logged once.
                log.debug("provider skipped: circuit open", extra={
                    "action": "provider_call", "provider": provider.name,
                    "error_type": CircuitOpen.error_type})
                waits.append(breaker.retry_in_s())
                # A wait is worth announcing only while no provider of the
                # chain was actually asked: one that was may answer any time.
                all_refused = len(waits) == position + 1
                last_error = CircuitOpen(provider.name, min(waits) if all_refused else None)
                continue
            started = time.perf_counter()
            try:
                with ticket:
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
            if position > 0:
                primary = self.get(chain[0]).name
                self._metrics.fallbacks.labels(primary, provider.name).inc()
                log.info("answered by a fallback provider", extra={
                    "action": "fallback", "provider": provider.name, "primary": primary,
                    "error_type": last_error.error_type if last_error else None})
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
