"""Health probes: is a provider answering? Asked the same way everywhere.

One function, `probe`, asks a provider's cheap health endpoint (Ollama's
`/api/tags`, an OpenAI-compatible `/v1/models`; the embedded model reports
whether it is loaded) within a short deadline and returns the error, if any.
Three callers use it, so they all judge a provider alike:

- `CircuitProber`: while a provider's circuit is open, one probe every
  `interval_s` (jittered, so replicas that opened together do not probe in
  step), and the circuit closes at the first answer. Without it, a circuit
  stayed open `CIRCUIT_OPEN_S` (a minute) after a 15-second outage.
- the worker at start: an unreachable provider is one WARNING naming its
  address, in the background (start-up never waits on it, never fails on it).
- `waddle-ai dlq replay`: says which provider is not answering, so an
  operator knows the replayed events will wait.

Why the embedded model's probe is only "loaded": it has no endpoint, and a
test generation would take a slot from chat exactly when the model is
overloaded (its usual failure). So an open local circuit closes at the first
probe: a pause of `interval_s`, after which real requests judge it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from providers.base import Provider
from providers.breaker import CircuitBreaker
from providers.errors import ProviderError, ProviderTimeout, ProviderUnavailable

if TYPE_CHECKING:
    from observability.metrics import Metrics

log = logging.getLogger(__name__)

# A health endpoint answers in milliseconds; one that takes seconds is not
# going to carry chat either. Connecting to a dead host is refused at once.
PROBE_TIMEOUT_S = 3.0
# Each wait is interval_s times a factor in this range.
JITTER = (0.75, 1.25)


async def probe(provider: Provider, timeout_s: float = PROBE_TIMEOUT_S) -> ProviderError | None:
    """None when the provider's health endpoint answers; else the error that says why not."""
    try:
        async with asyncio.timeout(timeout_s):
            await provider.check_health()
    except TimeoutError:
        return ProviderTimeout(provider.name, f"health check: no answer within {timeout_s:g}s")
    except ProviderError as exc:
        return exc
    except Exception as exc:  # a bug in a provider must not kill the prober
        return ProviderUnavailable(provider.name, f"health check: {type(exc).__name__}: {exc}")
    return None


class CircuitProber:
    """Asks one provider's health endpoint while its circuit is open; closes it on an answer.

    One per breaker per process ("one probe per endpoint per replica"): the
    router starts it when the circuit opens, and it ends by itself once the
    circuit is closed, whoever closed it (this probe, or a real request after
    the open time).
    """

    def __init__(
        self,
        breaker: CircuitBreaker,
        provider: Provider,
        *,
        interval_s: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._breaker = breaker
        self._provider = provider
        self._interval_s = interval_s
        self._metrics = metrics
        self._clock = clock
        self._timeout_s = timeout_s if timeout_s is not None else min(PROBE_TIMEOUT_S, interval_s)
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        # Scheduled now, not when the task first runs: an event refused in the
        # same moment must already know the circuit may close in seconds.
        first_wait = self._schedule_next()
        self._task = asyncio.get_running_loop().create_task(
            self._run(first_wait), name=f"circuit-probe-{self._provider.name}")

    def _schedule_next(self) -> float:
        wait = self._interval_s * self._rng.uniform(*JITTER)
        self._breaker.schedule_probe(self._clock() + wait)
        return wait

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._breaker.schedule_probe(None)

    async def aclose(self) -> None:
        task = self._task
        self.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, wait: float) -> None:
        try:
            while not self._breaker.closed:
                await asyncio.sleep(wait)
                if self._breaker.closed:
                    break  # a real request closed it meanwhile
                error = await probe(self._provider, self._timeout_s)
                self._count(error)
                if error is None:
                    log.info("health probe answered", extra={
                        "action": "circuit_probe", "provider": self._provider.name,
                        "result": "ok"})
                else:
                    log.debug("health probe failed", extra={
                        "action": "circuit_probe", "provider": self._provider.name,
                        "result": "failed", "error_type": error.error_type,
                        "error": str(error)})
                self._breaker.record_probe(error)
                wait = self._schedule_next()
        finally:
            self._breaker.schedule_probe(None)

    def _count(self, error: ProviderError | None) -> None:
        if self._metrics is not None:
            result = "ok" if error is None else "failed"
            self._metrics.circuit_probes.labels(self._provider.name, result).inc()
