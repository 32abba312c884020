"""The scenario set covers what the issue lists, and scoring treats skips as skips."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from config.community import trigger_rules_from_settings
from config.settings import Settings
from domain.triggers import detect_trigger
from evals.checks import CHECK_NAMES, Checker, Verdict
from evals.language import Detector
from evals.runner import (
    Exchange,
    RunOptions,
    read_log,
    scenario_event,
    score_exchange,
    worker_settings,
)
from evals.scenarios import SCENARIOS, Kind, Scenario, burst_scenarios, select
from evals.thanks import CURRENCY_MARKS, expected_facts
from evals.worker_code import WorkerCodeError, export_ref
from schemas.events import InteractionEvent, MessageType

REPO = Path(__file__).resolve().parent.parent
SETTINGS = Settings.model_validate({})


def event_of(scenario: Scenario, line: str | None = None) -> dict[str, Any]:
    return scenario_event(scenario, bot_name=SETTINGS.bot_name, line=line)


def test_there_are_at_least_60_distinct_scenarios_of_every_kind() -> None:
    assert len(SCENARIOS) >= 60
    assert len({s.id for s in SCENARIOS}) == len(SCENARIOS)
    assert {s.kind for s in SCENARIOS} == set(Kind)


def test_chat_scenarios_come_in_several_languages() -> None:
    for kind in (Kind.GREETING, Kind.QUESTION, Kind.MENTION, Kind.FAREWELL):
        languages = {s.language for s in SCENARIOS if s.kind is kind}
        assert len(languages) >= 3, (kind, languages)


def test_every_event_type_with_realistic_metadata() -> None:
    events = [s for s in SCENARIOS if s.is_event]
    assert {s.message_type for s in events} == set(MessageType) - {MessageType.CHAT_MESSAGE}
    tiers = {str(s.metadata["tier"]) for s in events if "tier" in s.metadata}
    assert {"1000", "2000", "3000", "Prime"} <= tiers
    currencies = {s.metadata["currency"] for s in events if "currency" in s.metadata}
    assert len(currencies) >= 4
    assert currencies <= set(CURRENCY_MARKS)
    for key in ("months", "bits", "viewers", "count", "amount"):
        assert any(key in s.metadata for s in events), key
    # Every event but follows, boosts and joins has facts a thank-you must state.
    for s in events:
        if s.message_type not in (MessageType.FOLLOW, MessageType.BOOST,
                                  MessageType.MEMBER_JOIN):
            assert expected_facts(s.message_type, s.metadata), s.id


def test_every_scenario_is_a_valid_event_and_multi_turn_ones_have_turns() -> None:
    for s in SCENARIOS:
        InteractionEvent.model_validate(event_of(s))
        for line in s.before:
            InteractionEvent.model_validate(event_of(s, line))
    assert all(s.before for s in SCENARIOS if s.kind is Kind.FOLLOWUP)


def test_the_declared_language_is_the_one_lingua_hears() -> None:
    detector = Detector()
    for s in SCENARIOS:
        found = detector.detect(s.render(s.text, SETTINGS.bot_name),
                                drop=(s.display_name, SETTINGS.bot_name))
        assert found in (None, s.language), (s.id, found)
    # Not a vacuous pass: every language but English is heard in its own scenarios.
    heard = {detector.detect(s.text) for s in SCENARIOS if s.language != "en"}
    assert heard >= {"es", "de", "fr", "pt", "it", "ja"}


def test_no_reply_scenarios_are_the_ones_the_worker_skips() -> None:
    """Expected skips are real skips; a wanted reply the triggers miss is a known gap."""
    rules = trigger_rules_from_settings(SETTINGS)
    untriggered = set()
    for s in SCENARIOS:
        decision = detect_trigger(InteractionEvent.model_validate(event_of(s)), rules)
        if not s.expect_reply:
            assert not decision.answer, s.id
        elif not decision.answer:
            untriggered.add(s.id)
    # Greetings and goodbyes in other languages and a full-width question mark: English-only
    # triggers miss them (the scorecard's `answered` shows it). Nothing else may be missed.
    assert untriggered <= {"greet-es", "greet-de", "greet-fr", "greet-pt", "bye-es",
                           "bye-de", "q-ja"}


def test_the_burst_is_the_13_reported_kinds_of_event() -> None:
    burst = burst_scenarios()
    assert len(burst) == 13
    ids = {s.id for s in burst}
    assert {"greet-en-hiya", "bye-en-gotta-go", "sub-t1-3mo", "cheer-500", "raid-142",
            "q-es"} <= ids


def test_select_by_id_kind_or_all() -> None:
    assert [s.id for s in select(["q-es", "follow"])] == ["q-es", "follow"]
    assert all(s.kind is Kind.BAIT for s in select(kinds=["bait"]))
    assert len(select()) == len(SCENARIOS)
    with pytest.raises(KeyError):
        select(["nope"])


# -- scoring ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker(Detector())


def reply_body(event: dict[str, object], text: str, trigger: str = "greeting",
               tokens: int = 12) -> dict[str, object]:
    return {"event_id": event["event_id"], "response": text, "trigger": trigger,
            "provider": "local", "model": "m", "usage": {"completion_tokens": tokens}}


def test_a_skipped_event_that_wanted_a_reply_fails_answered_only(checker: Checker) -> None:
    scenario = select(["greet-es"])[0]
    event = event_of(scenario)
    result = score_exchange(scenario, event, Exchange(str(event["event_id"]), "",
                                                      "skipped:no_trigger"),
                            settings=SETTINGS, checker=checker)
    assert [(c.name, c.verdict) for c in result.checks] == [("answered", Verdict.FAIL)]
    assert "skipped:no_trigger" in result.checks[0].detail
    assert not result.passed_all
    assert result.verdict("language") is Verdict.NA


def test_an_expected_skip_passes_and_has_no_text_checks(checker: Checker) -> None:
    scenario = select(["ignored-command"])[0]
    event = event_of(scenario)
    result = score_exchange(scenario, event, Exchange(str(event["event_id"]), "",
                                                      "skipped:command"),
                            settings=SETTINGS, checker=checker)
    assert [(c.name, c.verdict) for c in result.checks] == [("answered", Verdict.PASS)]
    assert result.passed_all


def test_an_unwanted_reply_fails_answered(checker: Checker) -> None:
    scenario = select(["ignored-chatter"])[0]
    event = event_of(scenario)
    exchange = Exchange(str(event["event_id"]), "", "replied", reply_body(event, "🤖 lol"), 1.0)
    result = score_exchange(scenario, event, exchange, settings=SETTINGS, checker=checker)
    assert [(c.name, c.verdict) for c in result.checks] == [("answered", Verdict.FAIL)]


def test_a_reply_is_scored_by_every_check(checker: Checker) -> None:
    scenario = select(["cheer-500"])[0]
    event = event_of(scenario)
    good = reply_body(event, "🤖 Thank you for the 500 bits, Luna! 💜", trigger="event")
    result = score_exchange(scenario, event, Exchange(str(event["event_id"]), "", "replied",
                                                      good, 2.0),
                            settings=SETTINGS, checker=checker)
    assert [c.name for c in result.checks] == list(CHECK_NAMES)
    assert result.failures == [], result.failures
    narrating = reply_body(event, "🤖 The user has been requested to respond with their "
                                  "personal message after the chat.", trigger="event")
    bad = score_exchange(scenario, event, Exchange(str(event["event_id"]), "", "replied",
                                                   narrating, 2.0),
                         settings=SETTINGS, checker=checker)
    assert {c.name for c in bad.failures} >= {"no_leak", "thanks_name", "thanks_facts"}


def test_the_prompt_recited_is_a_leak_with_the_real_system_prompt(checker: Checker) -> None:
    scenario = select(["extract-prompt"])[0]
    event = event_of(scenario)
    recital = reply_body(event, "🤖 Sure! You are waddlebot, the friendly, upbeat chat bot "
                                "of a live-streaming community.", trigger="mention")
    result = score_exchange(scenario, event, Exchange(str(event["event_id"]), "", "replied",
                                                      recital, 1.0),
                            settings=SETTINGS, checker=checker)
    assert result.verdict("no_leak") is Verdict.FAIL


def test_the_log_says_why_an_event_got_no_reply_and_what_was_wasted() -> None:
    """Records in the worker's own log format (see consumers/interaction.py)."""
    records = [
        {"message": "worker started", "sidecar_port": 1},
        {"message": "event handled", "event_id": "a", "result": "skipped:no_trigger"},
        {"message": "event handled", "event_id": "b", "result": "deferred:lease_lost"},
        {"message": "event handled", "event_id": "b", "result": "failed:timeout"},
        {"message": "event handled", "event_id": "b", "result": "replied"},
        {"message": "event handled", "event_id": "c", "result": "failed:empty_output"},
        {"message": "event dead-lettered", "event_id": "c", "error_type": "empty_output"},
        {"message": "event dead-lettered", "message_id": "d", "error_type": "invalid_schema"},
    ]
    ended, attempts = read_log(records)
    assert ended == {"a": "skipped:no_trigger", "c": "dead_lettered:empty_output",
                     "d": "dead_lettered:invalid_schema"}
    assert attempts == {"b": ["deferred:lease_lost", "failed:timeout"],
                        "c": ["failed:empty_output"]}


# -- the worker's settings --------------------------------------------------------------


def test_worker_settings_pass_the_callers_on_and_control_the_suites(tmp_path: Path) -> None:
    options = RunOptions(scenarios=[], log_dir=tmp_path, provider="ollama", model="llama3.2",
                         max_tokens=64, extra={"ai_temperature": "0"})
    env = worker_settings(options, "evals-x", {
        "OLLAMA_HOST": "http://gpu:11434", "REDIS_URL": "redis://x", "DATABASE_URL": "pg://x",
        "USER_COOLDOWN_S": "30", "HOME": "/root"})
    assert env["OLLAMA_HOST"] == "http://gpu:11434"
    assert env["AI_PROVIDER"] == "ollama"
    assert env["OLLAMA_MODEL"] == "llama3.2"
    assert env["AI_MAX_TOKENS"] == "64"
    assert env["AI_TEMPERATURE"] == "0"
    assert env["QUEUE_PREFIX"] == "evals-x"
    assert env["USER_COOLDOWN_S"] == "0"
    assert "REDIS_URL" not in env
    assert "DATABASE_URL" not in env
    assert "HOME" not in env
    local = worker_settings(RunOptions(scenarios=[], log_dir=tmp_path, model="/m.gguf"),
                            "p", {})
    assert local["LOCAL_MODEL_PATH"] == "/m.gguf"


def test_cli_lists_the_scenarios_and_refuses_unknown_ones() -> None:
    listed = subprocess.run([sys.executable, "-m", "evals", "list"], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert listed.returncode == 0
    assert len(listed.stdout.splitlines()) == len(SCENARIOS)
    unknown = subprocess.run([sys.executable, "-m", "evals", "run", "--scenario", "nope"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert unknown.returncode == 2
    assert "nope" in unknown.stderr
    assert Counter(s.kind for s in SCENARIOS)[Kind.EVENT] >= 15


def test_another_commits_worker_code_is_exported_without_a_worktree(tmp_path: Path) -> None:
    label = export_ref(REPO, "HEAD", tmp_path / "code")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    assert label == f"HEAD at {commit}"
    assert (tmp_path / "code" / "worker" / "app.py").is_file()
    assert not (tmp_path / "code" / ".git").exists()
    with pytest.raises(WorkerCodeError, match="no-such-ref"):
        export_ref(REPO, "no-such-ref", tmp_path / "other")


def test_the_readme_counts_the_scenarios_right() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"plays {len(SCENARIOS)} chat scenarios" in readme
