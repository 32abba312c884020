"""A circuit breaker per provider, so a dead backend stops costing every event a timeout.

Without it, each event waits out the primary's full timeout before its
fallback is tried, and a backend that is down keeps receiving the load that
would help it least. After `failure_threshold` consecutive retryable failures
the circuit opens: the provider is skipped without a request.

Two things close it again, whichever comes first:

- a health probe that answers (`record_probe`). While the circuit is open, a
  prober (`providers.probe.CircuitProber`) asks the provider's cheap health
  endpoint every `CIRCUIT_PROBE_S`, so a provider that is back is used again
  within seconds, not after the whole `open_s`;
- after `open_s`, one real request is let through (half-open); its result
  closes the circuit or opens it for another `open_s`. This is the backstop
  for a backend whose health endpoint fails while its chat would answer.

The breaker remembers the last real error (`last_error`), so a refusal can
say what is wrong ("connection refused to http://…") rather than only
"circuit open", and it reports how long each outage lasted.

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

from observability.metrics import Metrics
from providers.errors import ProviderError, ProviderUnavailable

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
    `retry_after_s` says when the circuit may close (its next health probe,
    or the end of its open time), like a Retry-After, so a waiting event need
    not come back while every circuit is still open. `last_error` is the
    failure that keeps it open, named in the message.
    """

    def __init__(
        self, provider: str, retry_after_s: float | None = None,
        last_error: ProviderError | None = None,
    ) -> None:
        message = "circuit open"
        if last_error is not None:
            message += f" (last error: {last_error.detail})"
        super().__init__(provider, message)
        self.retry_after_s = retry_after_s
        self.last_error = last_error


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
        on_open: Callable[[CircuitBreaker], None] | None = None,
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
        # Called when the circuit opens: the router starts the health prober.
        self._on_open = on_open
        self.last_error: ProviderError | None = None
        # When the current outage began (first CLOSED -> OPEN), for time-to-recovery.
        self._outage_since: float | None = None
        # When the prober will next ask the health endpoint (None: no prober).
        self._next_probe_at: float | None = None
        # The series exists from the start, so a dashboard shows "closed", not "no data".
        self._publish()

    @property
    def state(self) -> CircuitState:
        """The state now; an open circuit whose time is up reads (and becomes) half-open."""
        self._refresh()
        return self._state

    @property
    def closed(self) -> bool:
        return self.state is CircuitState.CLOSED

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in_s(self) -> float:
        """Seconds until the circuit may let requests through again; 0 unless open.

        The sooner of the next health probe and the end of the open time.
        """
        self._refresh()
        if self._state is not CircuitState.OPEN:
            return 0.0
        now = self._clock()
        until = self._opened_at + self.open_s
        if self._next_probe_at is not None:
            until = min(until, self._next_probe_at)
        return max(0.0, until - now)

    def refusal(self) -> CircuitOpen:
        """The error of a request this circuit refused: when to look again, and why."""
        return CircuitOpen(self.provider, self.retry_in_s(), self.last_error)

    def open_for_s(self) -> float | None:
        """How long the current outage has lasted; None while closed."""
        if self._outage_since is None:
            return None
        return self._clock() - self._outage_since

    # -- health probes, reported by the prober ---------------------------------

    def schedule_probe(self, at: float | None) -> None:
        """The prober's next probe time (this breaker's clock), or None when it stops."""
        self._next_probe_at = at

    def record_probe(self, error: ProviderError | None) -> None:
        """A health probe's result: None closes a circuit that is not closed.

        A failed probe keeps the circuit as it is; only its error is kept, as
        the freshest word on what is wrong.
        """
        if error is not None:
            self.last_error = error
            return
        self._refresh()
        if self._state is not CircuitState.CLOSED:
            self._transition(CircuitState.CLOSED, reason="health probe answered")

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
        self.last_error = error
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

    def _transition(
        self, state: CircuitState, error: ProviderError | None = None, *,
        reason: str = "the provider answered a request",
    ) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._probe_in_flight = False
        failures = self._failures
        self._failures = 0
        now = self._clock()
        if state is CircuitState.OPEN:
            self._opened_at = now
            if self._outage_since is None:
                self._outage_since = now
        if state is CircuitState.OPEN or state is CircuitState.CLOSED:
            self.opened_by = error
        outage_s: float | None = None
        if state is CircuitState.CLOSED and self._outage_since is not None:
            outage_s = now - self._outage_since
            self._outage_since = None
            self.last_error = None
            if self._metrics is not None:
                self._metrics.circuit_open_seconds.labels(self.provider).observe(outage_s)
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
            log.warning("circuit opened: %s; provider skipped until it answers a health "
                        "probe (at most %.3gs)", error or "failures", self.open_s, extra=extra)
        elif state is CircuitState.HALF_OPEN:
            log.info("circuit half-open: next request probes the provider", extra=extra)
        else:
            extra["reason"] = reason
            if outage_s is not None:
                extra["open_for_s"] = round(outage_s, 3)
            log.info("circuit closed: %s", reason, extra=extra)
        if state is CircuitState.OPEN and self._on_open is not None:
            self._on_open(self)

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.circuit_state.labels(self.provider).set(int(self._state))
