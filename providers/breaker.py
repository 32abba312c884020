"""A circuit breaker per provider, so a dead backend stops costing every event a timeout.

Without it, each event waits out the primary's full timeout before its
fallback is tried, and a backend that is down keeps receiving the load that
would help it least. After `failure_threshold` consecutive retryable failures
the circuit opens: the provider is skipped without a request for `open_s`.
Then one probe is let through (half-open); its result closes the circuit or
opens it for another `open_s`.

Only retryable failures count. A `ProviderBadRequest` is an answer from a
healthy backend about a bad request; it neither trips nor resets the count.
A failure with `opens_circuit` (the backend refused our credentials) opens
the circuit at once: every request would be refused the same way.

All of it is synchronous code run on one event loop: no method awaits, so no
two callers interleave inside one and no lock is needed. The asynchronous
part, the request itself, happens between `allow()` and the ticket's result.
A ticket remembers the breaker's generation when it was issued: results of
requests that started before a transition (the stragglers of a burst that
already opened the circuit) are ignored rather than acted on twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import IntEnum
from types import TracebackType

from providers.errors import ProviderError, ProviderUnavailable
from worker.metrics import Metrics

log = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_OPEN_S = 60.0


class CircuitState(IntEnum):
    """Values are what the `waddle_ai_circuit_state` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class CircuitOpen(ProviderUnavailable):
    """A provider skipped without a request because its circuit is open.

    Still a `ProviderUnavailable` (same `error_type`, retryable), so callers
    that know nothing of breakers treat it as the backend being down.
    `retry_after_s` says when a probe will be let through, like a
    Retry-After, so a retry need not come back while every circuit is still open.
    """

    def __init__(self, provider: str, retry_after_s: float | None = None) -> None:
        super().__init__(provider, "circuit open")
        self.retry_after_s = retry_after_s


class Ticket:
    """Leave to send one request; report its result exactly once.

    As a context manager it reports by itself: a normal exit is a success, a
    `ProviderError` is a failure (classified by the breaker), and anything
    else (cancellation, a bug) gives the leave back without a verdict, so a
    cancelled probe does not leave the circuit half-open with no probe.
    """

    __slots__ = ("_breaker", "_generation", "_settled", "probe")

    def __init__(self, breaker: CircuitBreaker, generation: int, *, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._settled = False
        self.probe = probe

    def record_success(self) -> None:
        if self._settle():
            self._breaker._on_success(self)

    def record_failure(self, error: ProviderError) -> None:
        if self._settle():
            self._breaker._on_failure(self, error)

    def release(self) -> None:
        """No verdict: the request was abandoned before the backend could be judged."""
        if self._settle():
            self._breaker._on_release(self)

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.record_success()
        elif isinstance(exc, ProviderError):
            self.record_failure(exc)
        else:
            self.release()


class CircuitBreaker:
    def __init__(
        self,
        provider: str,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        open_s: float = DEFAULT_OPEN_S,
        clock: Clock = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if open_s <= 0:
            raise ValueError("open_s must be positive")
        self.provider = provider
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._metrics = metrics
        self._state = CircuitState.CLOSED
        self._generation = 0
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        # The failure that opened the circuit, while it is not closed: it says
        # why a skipped provider is skipped (an auth failure is the operator's).
        self.opened_by: ProviderError | None = None
        # The series exists from the start, so a dashboard shows "closed", not "no data".
        self._publish()

    @property
    def state(self) -> CircuitState:
        """The state now; an open circuit whose time is up reads (and becomes) half-open."""
        self._refresh()
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in_s(self) -> float:
        """Seconds until a request may be let through again; 0 unless open."""
        self._refresh()
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.open_s - self._clock())

    def allow(self) -> Ticket | None:
        """A ticket to send one request, or None: skip this provider, do not call it."""
        self._refresh()
        if self._state is CircuitState.CLOSED:
            return Ticket(self, self._generation, probe=False)
        if self._state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return Ticket(self, self._generation, probe=True)
        return None

    # -- results, through a Ticket -------------------------------------------

    def _on_success(self, ticket: Ticket) -> None:
        if ticket._generation != self._generation:
            return
        if self._state is CircuitState.HALF_OPEN:
            self._transition(CircuitState.CLOSED)
        else:
            self._failures = 0

    def _on_failure(self, ticket: Ticket, error: ProviderError) -> None:
        if ticket._generation != self._generation:
            return
        if not error.retryable:
            # The backend answered; the request was at fault. A probe that got
            # this proved nothing either way, so the next request probes again.
            self._on_release(ticket)
            return
        if self._state is CircuitState.HALF_OPEN or error.opens_circuit:
            self._transition(CircuitState.OPEN, error)
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._transition(CircuitState.OPEN, error)

    def _on_release(self, ticket: Ticket) -> None:
        if ticket._generation == self._generation and ticket.probe:
            self._probe_in_flight = False

    # -- state machine -------------------------------------------------------

    def _refresh(self) -> None:
        if (self._state is CircuitState.OPEN
                and self._clock() - self._opened_at >= self.open_s):
            self._transition(CircuitState.HALF_OPEN)

    def _transition(self, state: CircuitState, error: ProviderError | None = None) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._probe_in_flight = False
        failures = self._failures
        self._failures = 0
        if state is CircuitState.OPEN:
            self._opened_at = self._clock()
        if state is CircuitState.OPEN or state is CircuitState.CLOSED:
            self.opened_by = error
        self._publish()
        extra: dict[str, object] = {
            "action": "circuit", "provider": self.provider, "state": state.label,
            "previous": previous.label,
        }
        if state is CircuitState.OPEN:
            extra["open_s"] = self.open_s
            if previous is CircuitState.CLOSED:
                extra["failures"] = failures
            if error is not None:
                extra["error_type"] = error.error_type
                extra["error"] = str(error)
            log.warning("circuit opened: provider skipped for %.3gs", self.open_s, extra=extra)
        elif state is CircuitState.HALF_OPEN:
            log.info("circuit half-open: next request probes the provider", extra=extra)
        else:
            log.info("circuit closed: provider answered the probe", extra=extra)

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.circuit_state.labels(self.provider).set(int(self._state))
