"""The circuit breaker's state machine, and the router's chain against real loopback fakes.

The breaker is driven by an injected clock, so "60 seconds later" costs no
time. The router tests send real HTTP to two `FakeProvider` servers (an
Ollama primary and an OpenAI-compatible fallback) and judge "the primary was
not called" by the primary's own request count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from config.settings import load_settings
from domain.chat import ChatMessage
from domain.provider_names import ProviderName
from observability.metrics import Metrics
from providers.base import ChatRequest
from providers.breaker import CircuitBreaker, CircuitOpen, CircuitState, Clock, Ticket
from providers.errors import (
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from providers.ollama import OllamaProvider
from providers.openai_compat import OpenAICompatProvider
from providers.router import ProviderRouter
from tests.fake_provider import Behaviour, FakeProvider
from worker.app import build_router

OLLAMA = ProviderName.OLLAMA
WADDLEAI = ProviderName.WADDLEAI
CHAIN = (OLLAMA, WADDLEAI)
REQUEST = ChatRequest(
    messages=[ChatMessage("system", "You are a bot"), ChatMessage("user", "hello bot")],
    max_tokens=64,
    model="llama3.2",
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def down(provider: str = "ollama") -> ProviderUnavailable:
    return ProviderUnavailable(provider, "HTTP 503")


def bad(provider: str = "ollama") -> ProviderBadRequest:
    return ProviderBadRequest(provider, "HTTP 400")


def gauge(metrics: Metrics, provider: str) -> float | None:
    return metrics.registry.get_sample_value("waddle_ai_circuit_state", {"provider": provider})


def fallbacks(metrics: Metrics, primary: str = "ollama", fallback: str = "waddleai") -> float:
    value = metrics.registry.get_sample_value(
        "waddle_ai_fallbacks_total", {"primary": primary, "fallback": fallback})
    return value or 0.0


def state_of(breaker: CircuitBreaker) -> CircuitState:
    """A call, not the property: mypy would narrow `breaker.state` across a transition."""
    return breaker.state


def allowed(breaker: CircuitBreaker) -> Ticket:
    ticket = breaker.allow()
    assert ticket is not None, f"circuit refused in state {breaker.state.label}"
    return ticket


def fail(breaker: CircuitBreaker, times: int, error: ProviderError | None = None) -> None:
    for _ in range(times):
        allowed(breaker).record_failure(error or down())


# -- the breaker alone ---------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def breaker(clock: FakeClock, metrics: Metrics) -> CircuitBreaker:
    return CircuitBreaker("ollama", failure_threshold=3, open_s=60, clock=clock, metrics=metrics)


def test_starts_closed_and_shows_it(breaker: CircuitBreaker, metrics: Metrics) -> None:
    assert state_of(breaker) is CircuitState.CLOSED
    assert gauge(metrics, "ollama") == 0


def test_opens_after_threshold_consecutive_failures(
    breaker: CircuitBreaker, metrics: Metrics
) -> None:
    fail(breaker, 2)
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.consecutive_failures == 2
    fail(breaker, 1)
    assert state_of(breaker) is CircuitState.OPEN
    assert gauge(metrics, "ollama") == 2


def test_every_retryable_error_counts(breaker: CircuitBreaker) -> None:
    allowed(breaker).record_failure(ProviderTimeout("ollama", "timed out"))
    allowed(breaker).record_failure(ProviderRateLimited("ollama", "429", retry_after_s=1))
    allowed(breaker).record_failure(down())
    assert state_of(breaker) is CircuitState.OPEN


def test_open_refuses_until_open_s_has_passed(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    fail(breaker, 3)
    clock.advance(59.9)
    assert breaker.allow() is None
    assert breaker.allow() is None
    assert state_of(breaker) is CircuitState.OPEN
    clock.advance(0.1)
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert gauge(metrics, "ollama") == 1


def test_retry_in_s_counts_down_the_open_time(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    assert breaker.retry_in_s() == 0
    fail(breaker, 3)
    assert breaker.retry_in_s() == 60
    clock.advance(45)
    assert breaker.retry_in_s() == 15
    clock.advance(15)
    assert breaker.retry_in_s() == 0


def test_half_open_lets_exactly_one_probe_through(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    clock.advance(60)
    probe = allowed(breaker)
    assert probe.probe
    assert [breaker.allow() for _ in range(5)] == [None] * 5
    assert state_of(breaker) is CircuitState.HALF_OPEN


def test_probe_success_closes_and_resets_the_count(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    fail(breaker, 3)
    clock.advance(60)
    allowed(breaker).record_success()
    assert state_of(breaker) is CircuitState.CLOSED
    assert gauge(metrics, "ollama") == 0
    assert breaker.consecutive_failures == 0
    fail(breaker, 2)  # a full threshold is needed again
    assert state_of(breaker) is CircuitState.CLOSED
    tickets = [allowed(breaker) for _ in range(4)]  # closed: no limit on concurrency
    assert all(not ticket.probe for ticket in tickets)


def test_probe_failure_opens_for_another_open_s(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics
) -> None:
    fail(breaker, 3)
    clock.advance(60)
    probe = allowed(breaker)
    clock.advance(5)  # the probe takes a while
    probe.record_failure(down())
    assert state_of(breaker) is CircuitState.OPEN
    assert gauge(metrics, "ollama") == 2
    clock.advance(59.9)
    assert breaker.allow() is None  # counted from the probe's failure, not its start
    clock.advance(0.1)
    assert allowed(breaker).probe


def test_bad_request_is_not_a_failure(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    fail(breaker, 10, bad())
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.consecutive_failures == 2  # neither counted nor a proof of health
    fail(breaker, 1)
    assert state_of(breaker) is CircuitState.OPEN


def test_bad_request_on_the_probe_lets_the_next_request_probe(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    clock.advance(60)
    allowed(breaker).record_failure(bad())
    assert state_of(breaker) is CircuitState.HALF_OPEN
    allowed(breaker).record_success()
    assert state_of(breaker) is CircuitState.CLOSED


def test_success_in_closed_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    for _ in range(5):
        fail(breaker, 2)
        allowed(breaker).record_success()
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0


def test_results_of_requests_started_before_a_transition_are_ignored(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    burst = [allowed(breaker) for _ in range(5)]
    for ticket in burst[:3]:
        ticket.record_failure(down())
    assert state_of(breaker) is CircuitState.OPEN
    burst[3].record_success()  # a straggler does not close the circuit
    burst[4].record_failure(down())  # nor does one re-open it for longer
    assert state_of(breaker) is CircuitState.OPEN
    clock.advance(60)
    assert state_of(breaker) is CircuitState.HALF_OPEN


def test_a_ticket_reports_once(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    ticket = allowed(breaker)
    ticket.record_success()
    ticket.record_failure(down())
    assert breaker.consecutive_failures == 0


def test_ticket_as_context_manager(breaker: CircuitBreaker, clock: FakeClock) -> None:
    with pytest.raises(ProviderUnavailable), allowed(breaker):
        raise down()
    assert breaker.consecutive_failures == 1
    with allowed(breaker):
        pass
    assert breaker.consecutive_failures == 0

    fail(breaker, 3)
    clock.advance(60)
    # A cancelled probe gives its place back, or the circuit would stay half-open forever.
    with pytest.raises(asyncio.CancelledError), allowed(breaker):
        raise asyncio.CancelledError
    assert state_of(breaker) is CircuitState.HALF_OPEN
    with allowed(breaker) as probe:
        assert probe.probe
    assert state_of(breaker) is CircuitState.CLOSED


def test_each_transition_is_logged_once(
    breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="providers.breaker")
    fail(breaker, 3)
    assert breaker.allow() is None
    clock.advance(60)
    assert state_of(breaker) is CircuitState.HALF_OPEN
    probe = allowed(breaker)
    assert breaker.allow() is None
    probe.record_success()
    fail(breaker, 1)
    records = [r for r in caplog.records if getattr(r, "action", None) == "circuit"]
    assert [(r.provider, r.state) for r in records] == [  # type: ignore[attr-defined]
        ("ollama", "open"), ("ollama", "half_open"), ("ollama", "closed")]
    assert records[0].levelno == logging.WARNING
    assert records[0].failures == 3  # type: ignore[attr-defined]


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("ollama", failure_threshold=0)
    with pytest.raises(ValueError, match="open_s"):
        CircuitBreaker("ollama", open_s=0)


# -- the router against real loopback servers -----------------------------------


@pytest.fixture
async def primary() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as server:
        server.reply_text = "primary here"
        yield server


@pytest.fixture
async def backup() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as server:
        server.reply_text = "backup here"
        yield server


def make_router(
    primary: FakeProvider, backup: FakeProvider, metrics: Metrics, *,
    failure_threshold: int, open_s: float, clock: Clock = time.monotonic,
) -> ProviderRouter:
    return ProviderRouter(
        {
            OLLAMA: OllamaProvider(base_url=primary.url, model="llama3.2", timeout_s=2.0),
            WADDLEAI: OpenAICompatProvider(base_url=backup.url, timeout_s=2.0),
        },
        metrics,
        failure_threshold=failure_threshold, open_s=open_s, clock=clock,
    )


@pytest.fixture
async def router(
    primary: FakeProvider, backup: FakeProvider, metrics: Metrics, clock: FakeClock
) -> AsyncIterator[ProviderRouter]:
    router = make_router(primary, backup, metrics, failure_threshold=3, open_s=60, clock=clock)
    yield router
    await router.aclose()


async def test_primary_answers_without_a_fallback(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics
) -> None:
    completion = await router.complete(CHAIN, REQUEST)
    assert (completion.provider, completion.text) == ("ollama", "primary here")
    assert (primary.calls, backup.calls) == (1, 0)
    assert fallbacks(metrics) == 0
    assert router.breaker_state(OLLAMA) == "closed"


async def test_fallback_answers_when_the_primary_fails_and_is_counted(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="providers.router")
    primary.script = [Behaviour(status=503)]
    completion = await router.complete(CHAIN, REQUEST)
    assert (completion.provider, completion.text) == ("waddleai", "backup here")
    assert (primary.calls, backup.calls) == (1, 1)
    assert fallbacks(metrics) == 1
    assert metrics.registry.get_sample_value(
        "waddle_ai_provider_errors_total",
        {"provider": "ollama", "error_type": "provider_unavailable"}) == 1
    assert backup.last.json["model"] == "auto"  # the community's model is the primary's
    logged = [r for r in caplog.records if getattr(r, "action", None) == "fallback"]
    assert len(logged) == 1
    assert logged[0].primary == "ollama"  # type: ignore[attr-defined]

    await router.complete(CHAIN, REQUEST)  # the primary is back
    assert fallbacks(metrics) == 1
    assert router.breaker(OLLAMA).consecutive_failures == 0


async def test_an_open_primary_is_not_called_while_the_fallback_answers(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics
) -> None:
    primary.status = 503
    for _ in range(3):
        assert (await router.complete(CHAIN, REQUEST)).provider == "waddleai"
    assert primary.calls == 3
    assert router.breaker_state(OLLAMA) == "open"
    assert gauge(metrics, "ollama") == 2
    assert gauge(metrics, "waddleai") == 0

    for _ in range(5):
        assert (await router.complete(CHAIN, REQUEST)).provider == "waddleai"
    assert primary.calls == 3
    assert backup.calls == 8
    assert fallbacks(metrics) == 8


async def test_after_open_s_one_probe_goes_to_the_primary(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics,
    clock: FakeClock,
) -> None:
    primary.status = 503
    for _ in range(3):
        await router.complete(CHAIN, REQUEST)
    clock.advance(60)
    assert router.breaker_state(OLLAMA) == "half_open"
    assert gauge(metrics, "ollama") == 1

    # The probe fails: open again, and the primary rests another open_s.
    await router.complete(CHAIN, REQUEST)
    assert primary.calls == 4
    assert router.breaker_state(OLLAMA) == "open"
    await router.complete(CHAIN, REQUEST)
    assert primary.calls == 4

    # The primary recovers; the next probe closes the circuit.
    primary.status = None
    clock.advance(60)
    completion = await router.complete(CHAIN, REQUEST)
    assert completion.provider == "ollama"
    assert primary.calls == 5
    assert router.breaker_state(OLLAMA) == "closed"
    assert gauge(metrics, "ollama") == 0


async def test_only_one_event_probes_while_others_go_to_the_fallback(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, clock: FakeClock
) -> None:
    primary.status = 503
    for _ in range(3):
        await router.complete(CHAIN, REQUEST)
    primary.status = None
    primary.latency_s = 0.3  # the probe is still in flight while the others arrive
    clock.advance(60)
    completions = await asyncio.gather(*(router.complete(CHAIN, REQUEST) for _ in range(6)))
    assert sorted(c.provider for c in completions) == ["ollama"] + ["waddleai"] * 5
    assert primary.calls == 4
    assert router.breaker_state(OLLAMA) == "closed"


async def test_open_s_in_real_time(
    primary: FakeProvider, backup: FakeProvider, metrics: Metrics
) -> None:
    router = make_router(primary, backup, metrics, failure_threshold=1, open_s=0.3)
    try:
        primary.script = [Behaviour(status=503)]
        await router.complete(CHAIN, REQUEST)
        await router.complete(CHAIN, REQUEST)
        assert primary.calls == 1
        await asyncio.sleep(0.35)
        assert (await router.complete(CHAIN, REQUEST)).provider == "ollama"
        assert primary.calls == 2
        assert router.breaker_state(OLLAMA) == "closed"
    finally:
        await router.aclose()


async def test_bad_request_is_raised_at_once_and_does_not_trip_the_circuit(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics
) -> None:
    primary.status = 400
    for _ in range(5):
        with pytest.raises(ProviderBadRequest):
            await router.complete(CHAIN, REQUEST)
    assert primary.calls == 5
    assert backup.calls == 0
    assert router.breaker_state(OLLAMA) == "closed"
    assert fallbacks(metrics) == 0


async def test_all_circuits_open_raise_circuit_open_without_any_request(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics,
    clock: FakeClock,
) -> None:
    primary.status = 503
    backup.status = 503
    for _ in range(3):
        with pytest.raises(ProviderUnavailable, match="overloaded"):
            await router.complete(CHAIN, REQUEST)
    assert (primary.calls, backup.calls) == (3, 3)
    assert gauge(metrics, "ollama") == gauge(metrics, "waddleai") == 2

    clock.advance(20)
    with pytest.raises(ProviderUnavailable, match="circuit open") as raised:
        await router.complete(CHAIN, REQUEST)
    assert raised.value.retryable  # so the event goes to the retry delay queues
    assert raised.value.error_type == "provider_unavailable"
    assert raised.value.provider == "waddleai"  # the last of the chain
    assert isinstance(raised.value, CircuitOpen)
    assert raised.value.retry_after_s == 40  # when the first circuit lets a probe through
    assert (primary.calls, backup.calls) == (3, 3)
    assert fallbacks(metrics) == 0


async def test_a_failed_fallback_after_an_open_primary_raises_its_own_error(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider
) -> None:
    primary.status = 503
    for _ in range(3):
        await router.complete(CHAIN, REQUEST)
    backup.script = [Behaviour(status=429, retry_after="7")]
    with pytest.raises(ProviderRateLimited) as raised:
        await router.complete(CHAIN, REQUEST)
    assert raised.value.retry_after_s == 7
    assert primary.calls == 3


async def test_a_failed_primary_before_an_open_fallback_raises_the_primarys_error(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider
) -> None:
    """The event failed for real (the primary was asked): that error is what it reports.

    It used to raise the fallback's "circuit open", which hid what went wrong and
    said nothing about the provider that was asked (issue 11: failure reasons).
    """
    backup.status = 503
    for _ in range(3):  # a community whose only provider is the proxy opens its circuit
        with pytest.raises(ProviderUnavailable):
            await router.complete((WADDLEAI,), REQUEST)
    assert router.breaker_state(WADDLEAI) == "open"

    primary.status = 503  # asked, failed; the open fallback refused without a request
    with pytest.raises(ProviderUnavailable) as raised:
        await router.complete(CHAIN, REQUEST)
    assert not isinstance(raised.value, CircuitOpen)  # a real failure: it spends a retry
    assert raised.value.provider == "ollama"
    assert "HTTP 503" in str(raised.value)
    assert backup.calls == 3


async def test_unknown_provider_has_no_breaker(router: ProviderRouter) -> None:
    with pytest.raises(LookupError, match="local"):
        router.breaker_state(ProviderName.LOCAL)


async def test_settings_reach_the_breakers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUIT_FAILURE_THRESHOLD", "7")
    monkeypatch.setenv("CIRCUIT_OPEN_S", "12.5")
    settings = load_settings(_env_file=None, ai_provider="ollama",
                             ai_fallback_providers="waddleai")
    assert (settings.circuit_failure_threshold, settings.circuit_open_s) == (7, 12.5)
    router, _ = await build_router(settings, Metrics(), None)
    try:
        for name in CHAIN:
            breaker = router.breaker(name)
            assert (breaker.failure_threshold, breaker.open_s) == (7, 12.5)
    finally:
        await router.aclose()


def test_settings_defaults_and_bounds() -> None:
    settings = load_settings(_env_file=None)
    assert (settings.circuit_failure_threshold, settings.circuit_open_s) == (5, 60.0)
    with pytest.raises(ValueError, match="CIRCUIT_FAILURE_THRESHOLD"):
        load_settings(_env_file=None, circuit_failure_threshold=0)
    with pytest.raises(ValueError, match="CIRCUIT_OPEN_S"):
        load_settings(_env_file=None, circuit_open_s=0)


# -- health probes close an open circuit (issue 11) ---------------------------------------


def test_a_probe_that_answers_closes_the_circuit_and_records_the_outage(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics,
) -> None:
    fail(breaker, 3, ProviderUnavailable("ollama", "connection refused to http://gpu:11434"))
    assert state_of(breaker) is CircuitState.OPEN
    clock.advance(4)
    breaker.record_probe(ProviderUnavailable("ollama", "connection refused again"))
    assert state_of(breaker) is CircuitState.OPEN  # a failed probe changes nothing but the why
    assert "connection refused again" in str(breaker.refusal())
    clock.advance(3)
    breaker.record_probe(None)
    assert state_of(breaker) is CircuitState.CLOSED
    assert gauge(metrics, "ollama") == 0
    assert allowed(breaker)  # requests flow at once, long before open_s
    assert metrics.registry.get_sample_value(
        "waddle_ai_circuit_open_seconds_count", {"provider": "ollama"}) == 1
    assert metrics.registry.get_sample_value(
        "waddle_ai_circuit_open_seconds_sum", {"provider": "ollama"}) == 7


def test_an_outage_is_measured_from_its_first_opening_across_reopenings(
    breaker: CircuitBreaker, clock: FakeClock, metrics: Metrics,
) -> None:
    fail(breaker, 3)
    clock.advance(60)
    fail(breaker, 1)  # the half-open request fails: open again, same outage
    clock.advance(10)
    breaker.record_probe(None)
    assert metrics.registry.get_sample_value(
        "waddle_ai_circuit_open_seconds_sum", {"provider": "ollama"}) == 70


def test_a_refusal_says_why_and_when_to_look_again(
    breaker: CircuitBreaker, clock: FakeClock,
) -> None:
    fail(breaker, 3, ProviderUnavailable("ollama", "connection refused to http://gpu:11434"))
    refusal = breaker.refusal()
    assert str(refusal) == (
        "ollama: circuit open (last error: connection refused to http://gpu:11434)")
    assert refusal.retry_after_s == 60  # no prober: the end of the open time
    breaker.schedule_probe(clock.now + 2)
    assert breaker.refusal().retry_after_s == 2  # the next probe may close it
    clock.advance(1.5)
    assert breaker.retry_in_s() == pytest.approx(0.5)


def test_the_breaker_calls_on_open_at_each_opening(clock: FakeClock) -> None:
    opened: list[CircuitState] = []
    breaker = CircuitBreaker("ollama", failure_threshold=1, open_s=10, clock=clock,
                             on_open=lambda b: opened.append(b.state))
    fail(breaker, 1)
    clock.advance(10)
    fail(breaker, 1)
    assert opened == [CircuitState.OPEN, CircuitState.OPEN]


async def test_the_router_probes_an_open_primary_and_closes_it_when_it_is_back(
    primary: FakeProvider, backup: FakeProvider, metrics: Metrics,
) -> None:
    """Real time, real sockets: no chat request is needed to notice the recovery."""
    router = ProviderRouter(
        {OLLAMA: OllamaProvider(base_url=primary.url, model="llama3.2", timeout_s=2.0)},
        metrics, failure_threshold=2, open_s=600, probe_s=0.05)
    try:
        await primary.go_down()
        for _ in range(2):
            with pytest.raises(ProviderUnavailable, match="connection refused"):
                await router.complete((OLLAMA,), REQUEST)
        assert router.breaker_state(OLLAMA) == "open"
        with pytest.raises(CircuitOpen) as refused:  # nothing asked: the event waits
            await router.complete((OLLAMA,), REQUEST)
        assert f"connection refused to {primary.url}" in str(refused.value)
        assert refused.value.retry_after_s is not None
        assert refused.value.retry_after_s < 0.1
        await asyncio.sleep(0.3)
        assert router.breaker_state(OLLAMA) == "open"  # probes fail while it is down

        await primary.come_back()
        for _ in range(100):
            if router.breaker_state(OLLAMA) == "closed":
                break
            await asyncio.sleep(0.02)
        assert router.breaker_state(OLLAMA) == "closed"
        assert primary.calls == 0  # closed by a health probe, not by a chat request
        assert primary.health_calls >= 1
        assert (await router.complete((OLLAMA,), REQUEST)).provider == "ollama"

        def probes(result: str) -> float:
            value = metrics.registry.get_sample_value(
                "waddle_ai_circuit_probes_total", {"provider": "ollama", "result": result})
            return value or 0.0

        assert probes("ok") == 1
        assert probes("failed") >= 1
        assert metrics.registry.get_sample_value(
            "waddle_ai_circuit_refusals_total", {"provider": "ollama"}) == 1
        await asyncio.sleep(0.2)
        assert probes("ok") == 1  # a closed circuit is not probed
    finally:
        await router.aclose()


async def test_without_probe_s_nothing_is_probed(
    primary: FakeProvider, backup: FakeProvider, metrics: Metrics,
) -> None:
    router = make_router(primary, backup, metrics, failure_threshold=1, open_s=600)
    try:
        primary.status = 503
        await router.complete(CHAIN, REQUEST)
        assert router.breaker_state(OLLAMA) == "open"
        await asyncio.sleep(0.2)
        assert primary.health_calls == 0
    finally:
        await router.aclose()


def test_circuit_probe_s_setting() -> None:
    assert load_settings(_env_file=None).circuit_probe_s == 2.0
    assert load_settings(_env_file=None, circuit_probe_s=0).circuit_probe_s == 0
    with pytest.raises(ValueError, match="CIRCUIT_PROBE_S"):
        load_settings(_env_file=None, circuit_probe_s=-1)


# -- one provider-call path: open_stream, and complete() collecting it ------------


async def test_open_stream_falls_back_before_the_first_piece_and_counts_it(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics
) -> None:
    primary.script = [Behaviour(status=503)]
    stream = await router.open_stream(CHAIN, REQUEST)
    try:
        assert (stream.provider.name, stream.position) == ("waddleai", 1)
        text = "".join([piece.text async for piece in stream.pieces()])
    finally:
        await stream.aclose()
    assert text == "backup here"
    assert (primary.calls, backup.calls) == (1, 1)
    assert fallbacks(metrics) == 1
    assert router.breaker(OLLAMA).consecutive_failures == 1
    assert router.breaker(WADDLEAI).consecutive_failures == 0


async def test_a_stream_left_before_its_end_gives_the_ticket_back_without_a_verdict(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, clock: FakeClock,
    metrics: Metrics,
) -> None:
    primary.status = 503
    for _ in range(3):
        await router.complete(CHAIN, REQUEST)
    clock.advance(60)
    assert router.breaker_state(OLLAMA) == "half_open"
    primary.status = None
    stream = await router.open_stream(CHAIN, REQUEST)  # the one probe goes to the primary
    assert stream.provider.name == "ollama"
    assert router.breaker(OLLAMA).allow() is None  # the probe is taken
    await stream.aclose()  # the client left: neither a success nor a failure
    assert router.breaker_state(OLLAMA) == "half_open"
    assert metrics.registry.get_sample_value(
        "waddle_ai_provider_latency_seconds_count", {"provider": "ollama"}) is None
    ticket = router.breaker(OLLAMA).allow()  # the leave came back: another probe may go
    assert ticket is not None
    ticket.release()


async def test_a_provider_cut_mid_answer_is_left_for_the_next_when_collected(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider, metrics: Metrics
) -> None:
    primary.script = [Behaviour(midstream_error=True)]
    completion = await router.complete(CHAIN, REQUEST)
    assert (completion.provider, completion.text) == ("waddleai", "backup here")
    assert (primary.calls, backup.calls) == (1, 1)
    assert router.breaker(OLLAMA).consecutive_failures == 1
    assert fallbacks(metrics) == 1


async def test_a_provider_cut_mid_stream_ends_the_stream_with_its_error(
    router: ProviderRouter, primary: FakeProvider, backup: FakeProvider
) -> None:
    primary.script = [Behaviour(midstream_error=True)]
    stream = await router.open_stream(CHAIN, REQUEST)
    try:
        with pytest.raises(ProviderError):
            async for _ in stream.pieces():
                pass
    finally:
        await stream.aclose()
    assert (primary.calls, backup.calls) == (1, 0)  # part of an answer was seen: no fallback
    assert router.breaker(OLLAMA).consecutive_failures == 1
