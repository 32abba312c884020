"""Settings validation: a bad value names its variable; odd but valid input is normalised.

Pure and fast (no services): part of the mutation run (`make mutants`).
"""

from __future__ import annotations

from typing import Any

import pytest

from config.settings import Settings, SettingsError, load_settings
from domain.provider_names import ProviderName


def settings(**values: Any) -> Settings:
    return load_settings(_env_file=None, **values)


def test_lists_come_from_comma_separated_text() -> None:
    s = settings(retry_delays_ms=" 100, 200 ,,400", known_bots="@NightBot, Moobot",
                 ai_fallback_providers="local", ai_provider="ollama", api_keys="a,b")
    assert s.retry_delays_ms == [100, 200, 400]
    assert s.known_bots == ["nightbot", "moobot"]
    assert s.ai_fallback_providers == [ProviderName.LOCAL]
    assert s.api_keys == ["a", "b"]


def test_lists_given_as_lists_are_kept() -> None:
    assert settings(retry_delays_ms=[5, 7]).retry_delays_ms == [5, 7]


@pytest.mark.parametrize("delays", ["1000,-5", "1000,0", "0"])
def test_delays_must_be_positive(delays: str) -> None:
    with pytest.raises(SettingsError, match=r"RETRY_DELAYS_MS: .*positive"):
        settings(retry_delays_ms=delays)


def test_delays_must_be_distinct() -> None:
    with pytest.raises(SettingsError, match=r"RETRY_DELAYS_MS: .*distinct"):
        settings(retry_delays_ms="1000,1000")
    assert settings(retry_delays_ms="1").retry_delays_ms == [1]


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error", "critical"])
def test_log_levels_are_upper_cased(level: str) -> None:
    assert settings(log_level=level).log_level == level.upper()


def test_an_unknown_log_level_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"LOG_LEVEL: .*DEBUG, INFO"):
        settings(log_level="verbose")


@pytest.mark.parametrize("name", ["redis_url", "database_url", "log_hash_key",
                                  "waddleai_api_key", "config_encryption_key"])
def test_an_empty_optional_value_means_unset(name: str) -> None:
    assert getattr(settings(**{name: "   "}), name) is None
    assert getattr(settings(**{name: "x"}), name) == "x"


def test_a_fallback_may_not_repeat_the_primary() -> None:
    with pytest.raises(SettingsError, match="AI_FALLBACK_PROVIDERS must not repeat AI_PROVIDER"):
        settings(ai_provider="ollama", ai_fallback_providers="local,ollama")
    assert settings(ai_provider="ollama", ai_fallback_providers="local").ai_fallback_providers


def test_the_error_names_every_bad_variable_and_hides_secrets() -> None:
    with pytest.raises(SettingsError) as caught:
        settings(ollama_port=99999, redis_url=12, max_concurrent_requests="zero")
    message = str(caught.value)
    assert message.startswith("invalid settings:\n  ")
    assert "OLLAMA_PORT: Input should be less than or equal to 65535 (got 99999)" in message
    assert "MAX_CONCURRENT_REQUESTS: " in message
    assert "(got 'zero')" in message
    assert "REDIS_URL: " in message
    assert "(got ***)" in message
    assert "12" not in message.split("REDIS_URL")[1]


def test_ollama_host_may_be_a_host_or_a_url() -> None:
    assert settings(ollama_host="gpu-box").ollama_base_url == "http://gpu-box:11434"
    assert settings(ollama_host="gpu-box", ollama_port=8080,
                    ollama_use_tls=True).ollama_base_url == "https://gpu-box:8080"
    assert settings(ollama_host=" http://gpu:1/ ").ollama_base_url == "http://gpu:1"


def test_redis_keys_share_the_queue_prefix() -> None:
    assert settings(queue_prefix="blue").redis_key_prefix == "blue:"


def test_the_crash_hooks_are_off_by_default() -> None:
    s = settings()
    assert s.waddle_test_crash_marker is None
    assert s.waddle_test_crash_after_confirm is None


def test_a_bad_key_is_hidden_and_nested_and_whole_model_errors_are_named() -> None:
    with pytest.raises(SettingsError) as caught:
        settings(waddleai_api_key=1234567, retry_delays_ms="1000,x")
    message = str(caught.value)
    assert "WADDLEAI_API_KEY: " in message
    assert "1234567" not in message
    assert "RETRY_DELAYS_MS_1: " in message  # the list item at fault
    assert message.count("\n  ") == 2  # one problem a line
    with pytest.raises(SettingsError) as caught:
        settings(ai_provider="local", ai_fallback_providers="local")
    # A rule across settings is its own message, alone on its line: no variable
    # name before it, no pydantic wording, and never the settings' values (keys).
    assert str(caught.value).endswith(
        "\n  AI_FALLBACK_PROVIDERS must not repeat AI_PROVIDER (local)")


def test_each_problem_is_on_a_line_of_its_own() -> None:
    with pytest.raises(SettingsError) as caught:
        settings(waddleai_api_key=1234567, retry_delays_ms="1000,x")
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid settings:"
    assert sorted(line.split(":")[0] for line in lines[1:]) == [
        "  RETRY_DELAYS_MS_1", "  WADDLEAI_API_KEY"]
