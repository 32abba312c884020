"""The pieces behind "a refused key is the operator's problem" and "never post mid-word".

Pure units (the breaker on a fake clock, the error mapping, the safety rule),
plus the Ollama provider against the fake that parses `keep_alive` as Ollama
does, which is how the operator's "-1" failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from consumers.completion_service import provider_error
from domain.chat import ChatMessage
from providers.base import ChatRequest, Completion
from providers.breaker import CircuitBreaker, CircuitState
from providers.errors import (
    ProviderAuthFailed,
    ProviderBadRequest,
    ProviderUnavailable,
)
from providers.http import error_for_status
from providers.ollama import OllamaProvider
from publishers.safety import drop_unfinished_sentence, make_safe
from schemas.events import Platform
from tests.fake_provider import FakeProvider


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_401_and_403_are_refused_credentials_not_bad_requests() -> None:
    for status in (401, 403):
        error = error_for_status("waddleai", status, "Invalid API Key")
        assert isinstance(error, ProviderAuthFailed)
        assert error.retryable
        assert error.opens_circuit
        assert error.error_type == "upstream_auth_failed"
    assert isinstance(error_for_status("waddleai", 400, "bad"), ProviderBadRequest)
    assert isinstance(error_for_status("waddleai", 404, "no model"), ProviderBadRequest)


def test_one_refusal_opens_the_circuit_and_it_remembers_why() -> None:
    clock = Clock()
    breaker = CircuitBreaker("waddleai", failure_threshold=5, open_s=10, clock=clock)
    ticket = breaker.allow()
    assert ticket is not None
    ticket.record_failure(ProviderAuthFailed("waddleai", 401, "Invalid API Key"))
    assert breaker.state is CircuitState.OPEN
    assert isinstance(breaker.opened_by, ProviderAuthFailed)
    assert breaker.allow() is None

    clock.now = 10.0  # the probe is refused again: open again, same cause
    probe = breaker.allow()
    assert probe is not None
    probe.record_failure(ProviderAuthFailed("waddleai", 401, "Invalid API Key"))
    assert breaker.state is CircuitState.OPEN
    assert isinstance(breaker.opened_by, ProviderAuthFailed)

    clock.now = 20.0  # the key was fixed: the probe answers, the circuit closes
    probe = breaker.allow()
    assert probe is not None
    probe.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.opened_by is None


def test_other_failures_still_need_the_threshold() -> None:
    breaker = CircuitBreaker("ollama", failure_threshold=2, open_s=10, clock=Clock())
    ticket = breaker.allow()
    assert ticket is not None
    ticket.record_failure(ProviderUnavailable("ollama", "HTTP 503"))
    assert breaker.state is CircuitState.CLOSED


def test_the_api_answers_a_refused_key_with_502_upstream_auth_failed() -> None:
    error = provider_error(ProviderAuthFailed("waddleai", 403, "forbidden sk-secret"),
                           secrets=["sk-secret"])
    assert error.status == 502
    assert error.code == error.type == "upstream_auth_failed"
    assert "sk-secret" not in error.message
    assert provider_error(ProviderBadRequest("waddleai", "HTTP 400: no")).status == 400


@pytest.mark.parametrize(("text", "kept"), [
    ("Hello there! How can I assist you", "Hello there!"),
    ('Sure. "Go team!" and then', 'Sure. "Go team!"'),
    ("It costs 3.5 coins and", ""),
    ("Welcome to the str", ""),
    ("All done.", "All done."),
    ("Wow… nice (really.) then", "Wow… nice (really.)"),
])
def test_a_cut_reply_keeps_its_whole_sentences(text: str, kept: str) -> None:
    assert drop_unfinished_sentence(text) == kept


def test_make_safe_trims_only_a_cut_reply() -> None:
    text = "Hey Alice, welcome in! Glad you made it to the str"
    assert make_safe(text, Platform.TWITCH, truncated=True) == "Hey Alice, welcome in!"
    assert make_safe(text, Platform.TWITCH) == text
    assert make_safe("Welcome to the str", Platform.TWITCH, prefix="🤖 ", truncated=True) == ""


def test_length_is_what_every_provider_calls_a_cut() -> None:
    assert Completion("x", "m", "ollama", finish_reason="length").truncated
    assert not Completion("x", "m", "ollama", finish_reason="stop").truncated
    assert not Completion("x", "m", "ollama").truncated


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as server:
        yield server


async def test_ollama_refuses_seconds_sent_as_a_string_and_takes_a_number(
    fake: FakeProvider,
) -> None:
    """The operator's OLLAMA_KEEP_ALIVE=-1 bug: the string is a 400, the number is fine."""
    request = ChatRequest(messages=[ChatMessage("user", "hi")], max_tokens=8)
    as_string = OllamaProvider(base_url=fake.url, model="llama3.2", keep_alive="-1")
    as_number = OllamaProvider(base_url=fake.url, model="llama3.2", keep_alive=-1)
    try:
        with pytest.raises(ProviderBadRequest, match="missing unit in duration"):
            await as_string.complete(request)
        answer = await as_number.complete(request)
    finally:
        await as_string.aclose()
        await as_number.aclose()
    assert answer.text
    assert fake.last.json["keep_alive"] == -1
