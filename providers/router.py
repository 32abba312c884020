"""Choose which provider answers: the community's primary, then its fallbacks.

A retryable failure of one provider moves on to the next in the chain; a
request the backend refuses (`ProviderBadRequest`) is not sent elsewhere,
since the next backend would most likely refuse it too and the event belongs
in the DLQ. The error of the last provider tried is raised when none answers.

Each provider has a circuit breaker (`providers.breaker`): while a provider's
circuit is open it is skipped without a request. So a dead primary costs each
event nothing instead of a full timeout. When every circuit of the chain is
open, nothing was asked and nothing failed: a `CircuitOpen` is raised, with
`retry_after_s` saying when the first circuit may close and the last real
error saying why it is open, and the event waits without spending a retry.
When at least one provider was asked, its own error is raised instead (the
real failure, not the refusal of a later one).

While a circuit is open, a prober asks that provider's health endpoint every
`probe_s` (one task per breaker, `providers.probe`) and closes it as soon as
it answers.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from domain.provider_names import ProviderName
from observability.metrics import Metrics
from providers.base import (
    ChatRequest,
    Completion,
    CompletionChunk,
    Provider,
    close_stream,
    join_chunks,
)
from providers.breaker import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_OPEN_S,
    CircuitBreaker,
    CircuitOpen,
    Clock,
    Ticket,
)
from providers.errors import ProviderError, log_provider_failure
from providers.factory import Endpoint
from providers.probe import CircuitProber

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
        probe_s: float | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        """`probe_s`: how often an open circuit's health endpoint is asked (None: never).

        `secrets`: API keys to blank out of the failures it logs.
        """
        self._providers = dict(providers)
        self._secrets = tuple(s for s in secrets if s)
        self._metrics = metrics
        self._breaker_options = {
            "failure_threshold": failure_threshold, "open_s": open_s, "clock": clock}
        self._clock = clock
        self._probe_s = probe_s
        self._probers: dict[CircuitBreaker, CircuitProber] = {}
        self._breakers: dict[ProviderKey, CircuitBreaker] = {
            name: self._new_breaker(provider) for name, provider in self._providers.items()
        }
        self._endpoint_factory = endpoint_factory
        self._endpoints: OrderedDict[Endpoint, Provider] = OrderedDict()
        self._retired: list[Provider] = []
        self._closed = False

    def _new_breaker(self, provider: Provider) -> CircuitBreaker:
        def on_open(breaker: CircuitBreaker) -> None:
            self._start_prober(breaker, provider)

        return CircuitBreaker(provider.name, metrics=self._metrics,
                              on_open=on_open if self._probe_s else None,
                              **self._breaker_options)  # type: ignore[arg-type]

    def _start_prober(self, breaker: CircuitBreaker, provider: Provider) -> None:
        """One prober per breaker: a circuit that reopens keeps the one it has."""
        if self._closed or self._probe_s is None:
            return
        prober = self._probers.get(breaker)
        if prober is not None and prober.running:
            return
        prober = CircuitProber(breaker, provider, interval_s=self._probe_s,
                               metrics=self._metrics, clock=self._clock)
        self._probers[breaker] = prober
        prober.start()

    def hide(self, secrets: Sequence[str]) -> None:
        """API keys never to appear in the failures it logs (a backend may echo one)."""
        self._secrets = (*self._secrets, *(s for s in secrets if s and s not in self._secrets))

    def refused(self, key: ProviderKey) -> CircuitOpen:
        """A request `key`'s open circuit refused: counted, and the error saying why."""
        breaker = self._breakers[key]
        self._metrics.circuit_refusals.labels(breaker.provider).inc()
        return breaker.refusal()

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
            dropped = self._breakers.pop(old, None)
            prober = self._probers.pop(dropped, None) if dropped is not None else None
            if prober is not None:
                prober.cancel()
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

    async def open_stream(
        self, chain: Sequence[ProviderKey], request: ChatRequest
    ) -> ProviderStream:
        """The answer of the first provider in `chain` that gives a first piece.

        Each provider is asked through its circuit breaker: an open circuit
        skips it without a request. A retryable failure before the first
        piece moves on to the next provider; after it, the caller has seen
        part of one provider's answer, so an error can only end the stream.
        """
        return await self._open(chain, request, _Attempts(), 0)

    async def complete(
        self, chain: Sequence[ProviderKey], request: ChatRequest
    ) -> Completion:
        """Stream the answer from the first provider in `chain` that gives one, joined.

        Nobody has seen a piece of a collected answer, so a provider that fails
        mid-answer is left for the next one in the chain, as if it had failed
        before its first piece.
        """
        attempts = _Attempts()
        start = 0
        while True:
            stream = await self._open(chain, request, attempts, start)
            try:
                return await stream.collect()
            except ProviderError as exc:
                if not exc.retryable:
                    raise
                log_provider_failure(log, "provider failed", exc, self._secrets)
                start = stream.position + 1
            finally:
                await stream.aclose()

    async def _open(
        self, chain: Sequence[ProviderKey], request: ChatRequest, attempts: _Attempts,
        start: int,
    ) -> ProviderStream:
        if not chain:
            raise ValueError("no provider to ask")
        for position in range(start, len(chain)):
            key = chain[position]
            provider = self.get(key)
            ticket = self._breakers[key].allow()
            if ticket is None:
                # Debug only: while a circuit is open this happens on every
                # event, and the transition itself was logged once.
                log.debug("provider skipped: circuit open", extra={
                    "action": "provider_call", "provider": provider.name,
                    "error_type": CircuitOpen.error_type})
                attempts.refusals.append(self.refused(key))
                continue
            asked = request if position == 0 else _without_model(request)
            started = time.perf_counter()
            chunks = provider.stream(asked)
            try:
                first: CompletionChunk | None = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except ProviderError as exc:
                ticket.record_failure(exc)
                await close_stream(chunks)
                attempts.failed(exc)
                self._metrics.provider_errors.labels(provider.name, exc.error_type).inc()
                if not exc.retryable:
                    raise
                log_provider_failure(log, "provider failed", exc, self._secrets)
                continue
            except BaseException:
                ticket.release()
                await close_stream(chunks)
                raise
            return ProviderStream(
                provider, position, asked, first, chunks, ticket,
                started=started, metrics=self._metrics, attempts=attempts,
                primary=self.get(chain[0]).name)
        raise attempts.error()

    async def aclose(self) -> None:
        self._closed = True
        for prober in list(self._probers.values()):
            await prober.aclose()
        self._probers.clear()
        for provider in [*self._providers.values(), *self._endpoints.values(), *self._retired]:
            await provider.aclose()


@dataclass(slots=True)
class _Attempts:
    """What happened to the providers of one chain asked so far."""

    real_error: ProviderError | None = None
    refusals: list[CircuitOpen] = field(default_factory=list)

    def failed(self, exc: ProviderError) -> None:
        self.real_error = exc

    @property
    def failed_before(self) -> ProviderError | None:
        return self.real_error or (self.refusals[-1] if self.refusals else None)

    def error(self) -> ProviderError:
        """Why no provider answered."""
        if self.real_error is not None:
            # A provider was asked and failed: that is what happened to this
            # request, whatever circuits refused the rest of the chain.
            return self.real_error
        # Every circuit refused: the first that may close is when to look again.
        last = self.refusals[-1]
        return CircuitOpen(last.provider, min(r.retry_after_s or 0.0 for r in self.refusals),
                           last.last_error)


class ProviderStream:
    """One provider's answer, opened by `ProviderRouter.open_stream`.

    Its first piece is already there; the rest arrives as `pieces()` is
    iterated. The circuit breaker's verdict and the provider metrics are
    settled by the stream itself: a success when it runs out, a failure on a
    provider error, and no verdict at all when the caller leaves early
    (`aclose()` before the end gives the breaker's ticket back).
    """

    def __init__(
        self, provider: Provider, position: int, request: ChatRequest,
        first: CompletionChunk | None, chunks: AsyncIterator[CompletionChunk], ticket: Ticket,
        *, started: float, metrics: Metrics, attempts: _Attempts, primary: str,
    ) -> None:
        self.provider = provider
        # Where in the chain it stands: 0 is the primary, more is a fallback.
        self.position = position
        self.request = request
        self.first = first
        self._chunks = chunks
        self._ticket = ticket
        self._started = started
        self._metrics = metrics
        self._attempts = attempts
        self._primary = primary

    @property
    def model(self) -> str:
        """The model that answers, as far as it is known before the end."""
        if self.first is not None and self.first.model:
            return self.first.model
        return self.request.model or self.provider.default_model

    async def pieces(self) -> AsyncGenerator[CompletionChunk, None]:
        """Every piece, the first included; a `ProviderError` ends it, counted."""
        piece = self.first
        try:
            while piece is not None:
                yield piece
                piece = await anext(self._chunks, None)
        except ProviderError as exc:
            self._ticket.record_failure(exc)
            self._attempts.failed(exc)
            self._metrics.provider_errors.labels(self.provider.name, exc.error_type).inc()
            raise
        self._ticket.record_success()
        self._answered()

    async def collect(self) -> Completion:
        """The whole answer in one `Completion`."""
        return await join_chunks(self.pieces(), provider=self.provider.name,
                                 model=self.request.model or self.provider.default_model)

    async def aclose(self) -> None:
        """Release the provider's response; a stream left before its end judged nothing."""
        self._ticket.release()
        await close_stream(self._chunks)

    def _answered(self) -> None:
        name = self.provider.name
        self._metrics.provider_latency.labels(name).observe(time.perf_counter() - self._started)
        if self.position > 0:
            self._metrics.fallbacks.labels(self._primary, name).inc()
            failed_before = self._attempts.failed_before
            log.info("answered by a fallback provider", extra={
                "action": "fallback", "provider": name, "primary": self._primary,
                "error_type": failed_before.error_type if failed_before else None})


def _without_model(request: ChatRequest) -> ChatRequest:
    """A community's model name belongs to its primary provider; fallbacks use their own."""
    return ChatRequest(
        messages=request.messages, temperature=request.temperature,
        max_tokens=request.max_tokens, model=None,
    )
