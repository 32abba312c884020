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
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from config.settings import ProviderName
from providers.base import ChatRequest, Completion, Provider, collect
from providers.breaker import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_OPEN_S,
    CircuitBreaker,
    CircuitOpen,
    Clock,
)
from providers.errors import ProviderError, log_provider_failure
from providers.factory import Endpoint
from worker.metrics import Metrics

log = logging.getLogger(__name__)

ProviderKey = ProviderName | Endpoint
# Builds the provider of a community's endpoint: (kind, base_url, api_key).
EndpointFactory = Callable[[ProviderName, str | None, str | None], Provider]
MAX_ENDPOINTS = 256


class ProviderRouter:
    def __init__(
        self,
        providers: Mapping[ProviderName, Provider],
        metrics: Metrics,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        open_s: float = DEFAULT_OPEN_S,
        clock: Clock = time.monotonic,
        endpoint_factory: EndpointFactory | None = None,
    ) -> None:
        self._providers = dict(providers)
        self._metrics = metrics
        self._breaker_options = {
            "failure_threshold": failure_threshold, "open_s": open_s, "clock": clock}
        self._breakers: dict[ProviderKey, CircuitBreaker] = {
            name: self._new_breaker(provider) for name, provider in self._providers.items()
        }
        self._endpoint_factory = endpoint_factory
        self._endpoints: OrderedDict[Endpoint, Provider] = OrderedDict()
        self._retired: list[Provider] = []

    def _new_breaker(self, provider: Provider) -> CircuitBreaker:
        return CircuitBreaker(provider.name, metrics=self._metrics,
                              **self._breaker_options)  # type: ignore[arg-type]

    @property
    def providers(self) -> Mapping[ProviderName, Provider]:
        """The providers of the settings (communities' own endpoints not included)."""
        return self._providers

    def endpoint(
        self, kind: ProviderName, base_url: str | None, api_key: str | None
    ) -> ProviderKey:
        """The key of a community's own endpoint, its provider built on first use.

        Pooled per distinct (kind, address, key) so every community that
        shares an endpoint shares its HTTP client and its circuit breaker.
        """
        if kind is ProviderName.LOCAL or (base_url is None and api_key is None):
            return kind
        if self._endpoint_factory is None:
            raise LookupError("this router cannot build community endpoints")
        endpoint = Endpoint.of(kind, base_url, api_key)
        if endpoint in self._endpoints:
            self._endpoints.move_to_end(endpoint)
            return endpoint
        provider = self._endpoint_factory(kind, base_url, api_key)
        self._endpoints[endpoint] = provider
        self._breakers[endpoint] = self._new_breaker(provider)
        if len(self._endpoints) > MAX_ENDPOINTS:
            # The least recently used endpoint is dropped from the pool; its
            # client is closed at shutdown, as a request may still be using it.
            old, retired = self._endpoints.popitem(last=False)
            self._breakers.pop(old, None)
            self._retired.append(retired)
        return endpoint

    def get(self, key: ProviderKey) -> Provider:
        if isinstance(key, Endpoint):
            if key in self._endpoints:
                return self._endpoints[key]
            raise LookupError(f"endpoint {key} is not (or no longer) in the pool")
        try:
            return self._providers[key]
        except KeyError:
            raise LookupError(
                f"provider {key.value!r} is not configured in this worker "
                f"(configured: {', '.join(p.value for p in self._providers)})"
            ) from None

    def breaker(self, key: ProviderKey) -> CircuitBreaker:
        self.get(key)  # the same LookupError for an unknown name
        return self._breakers[key]

    def breaker_state(self, key: ProviderKey) -> str:
        """`closed`, `half_open` or `open`, for /readyz."""
        return self.breaker(key).state.label

    async def complete(
        self, chain: Sequence[ProviderKey], request: ChatRequest
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
                log_provider_failure(log, "provider failed", exc)
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
        for provider in [*self._providers.values(), *self._endpoints.values(), *self._retired]:
            await provider.aclose()


def _without_model(request: ChatRequest) -> ChatRequest:
    """A community's model name belongs to its primary provider; fallbacks use their own."""
    return ChatRequest(
        messages=request.messages, temperature=request.temperature,
        max_tokens=request.max_tokens, model=None,
    )
