from __future__ import annotations

from typing import Any

import pytest

from config.community import trigger_rules_from_settings
from config.settings import Settings
from domain.triggers import (
    DEFAULT_TRIGGERS,
    EVENT_TYPES,
    TriggerDecision,
    TriggerRules,
    detect_trigger,
    is_farewell,
    is_greeting,
    is_question,
)
from schemas.events import InteractionEvent, MessageType, Platform
from schemas.replies import Trigger

RULES = TriggerRules(bot_name="waddlebot", known_bots=frozenset({"nightbot", "StreamElements"}))


def make_event(
    content: str = "",
    *,
    message_type: MessageType = MessageType.CHAT_MESSAGE,
    username: str = "alice",
    display_name: str | None = "Alice",
    metadata: dict[str, Any] | None = None,
    user_id: str = "u1",
) -> InteractionEvent:
    return InteractionEvent(
        event_id="e1",
        community_id="c1",
        platform=Platform.TWITCH,
        channel_id="ch1",
        user_id=user_id,
        username=username,
        display_name=display_name,
        message_type=message_type,
        message_content=content,
        metadata=metadata or {},
    )


def decide(content: str = "", rules: TriggerRules = RULES, **kwargs: Any) -> TriggerDecision:
    return detect_trigger(make_event(content, **kwargs), rules)


# --- decisions -----------------------------------------------------------------


def test_decision_answer_property() -> None:
    assert TriggerDecision.reply(Trigger.GREETING).answer is True
    skipped = TriggerDecision.skip("no_trigger")
    assert skipped.answer is False
    assert skipped.trigger is None


def test_decision_needs_exactly_one_of_trigger_and_reason() -> None:
    with pytest.raises(ValueError, match="either"):
        TriggerDecision()
    with pytest.raises(ValueError, match="either"):
        TriggerDecision(trigger=Trigger.GREETING, skip_reason="no_trigger")


def test_rules_defaults_and_from_settings() -> None:
    rules = trigger_rules_from_settings(Settings(bot_name="Pengu", known_bots=["NightBot"]))
    assert rules.bot_name == "Pengu"
    assert rules.known_bots == frozenset({"nightbot"})
    assert rules.enabled_triggers == DEFAULT_TRIGGERS
    assert Trigger.PROACTIVE not in rules.enabled_triggers
    assert rules.answered_events == EVENT_TYPES
    assert MessageType.CHAT_MESSAGE not in rules.answered_events


def test_rules_normalise_known_bots_and_reject_empty_name() -> None:
    assert RULES.known_bots == frozenset({"nightbot", "streamelements"})
    with pytest.raises(ValueError, match="bot_name"):
        TriggerRules(bot_name=" @ ")


# --- chat triggers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["hi", "Hello everyone", "hey, how's it going", "howdy", "hiya!", "sup", "greetings",
     "o7", "HEY", "Hi!!", "hiii", "heyyy", "helloooo", "heeey", "suppp", "hihi",
     "lol hi chat", "hey🐧", "(hi)"],
)
def test_greetings(text: str) -> None:
    assert decide(text) == TriggerDecision.reply(Trigger.GREETING)


@pytest.mark.parametrize(
    "text",
    ["bye", "Goodbye all", "cya tomorrow", "byeee", "byebye", "bye-bye", "later!",
     "Later chat", "ok see you later", "catch ya later", "gonna !lurk now", "BYE"],
)
def test_farewells(text: str) -> None:
    assert decide(text) == TriggerDecision.reply(Trigger.FAREWELL)


@pytest.mark.parametrize(
    "text",
    ["this is great", "which one", "they are good", "support the stream", "history buff",
     "shipping soon", "sushi time", "ohio", "superb play", "heyday", "hell yeah", "hilarious",
     "shiny", "byte", "cyan", "lately", "I'll do it later", "o70", "sup3r", "thigh",
     "nothing to see here"],
)
def test_substring_traps_do_not_fire(text: str) -> None:
    assert decide(text) == TriggerDecision.skip("no_trigger")


@pytest.mark.parametrize(
    "text", ["what time is it?", "is this live ?", "why????", "hi, how are you?", "bye?"]
)
def test_questions(text: str) -> None:
    assert decide(text) == TriggerDecision.reply(Trigger.QUESTION)


def test_question_mark_in_url_or_alone_is_not_a_question() -> None:
    assert not is_question("look https://example.com/watch?v=abc")
    assert not is_question("???")
    assert is_question("seen https://example.com/?q=1 ?")


@pytest.mark.parametrize(
    "text", ["这是什么游戏？", "配信は何時からですか？", "ما هذه اللعبة؟", "¿qué juego es este",
             "¿cuándo es el próximo stream?"],
)
def test_questions_in_other_scripts(text: str) -> None:
    """Full-width (Chinese, Japanese), Arabic and Spanish opening question marks."""
    assert decide(text) == TriggerDecision.reply(Trigger.QUESTION)


def test_other_question_marks_alone_are_not_questions() -> None:
    assert not is_question("？？？")
    assert not is_question("¿¿")


@pytest.mark.parametrize(
    "text",
    ["@waddlebot", "@WaddleBot you there", "waddlebot is cool", "I think Waddlebot rocks",
     "thanks @waddlebot!", "yo waddlebot,", "waddlebot's hat"],
)
def test_mentions(text: str) -> None:
    assert decide(text) == TriggerDecision.reply(Trigger.MENTION)


@pytest.mark.parametrize(
    "text", ["waddlebots are cool", "mywaddlebot", "waddlebot_fan", "email me@waddlebot"]
)
def test_mention_needs_word_boundaries(text: str) -> None:
    assert decide(text) == TriggerDecision.skip("no_trigger")


def test_mention_from_metadata_flag() -> None:
    assert decide("look at this", metadata={"mentions_bot": True}).trigger is Trigger.MENTION
    assert decide("look at this", metadata={"mentions_bot": "true"}).trigger is Trigger.MENTION
    assert decide("look at this", metadata={"mentions_bot": "false"}).trigger is None


def test_bot_name_with_regex_characters() -> None:
    rules = TriggerRules(bot_name="bot.v2+")
    assert decide("hey @bot.v2+ there", rules=rules).trigger is Trigger.MENTION
    assert decide("botxv2 ok", rules=rules).trigger is None


def test_priority_mention_question_greeting_farewell() -> None:
    assert decide("hi @waddlebot, how are you? bye").trigger is Trigger.MENTION
    assert decide("hi, how are you? bye").trigger is Trigger.QUESTION
    assert decide("hi and bye").trigger is Trigger.GREETING
    assert decide("ok bye").trigger is Trigger.FAREWELL


def test_predicates_are_case_insensitive() -> None:
    assert is_greeting("HELLO")
    assert is_farewell("GoodBye")
    assert is_farewell("!LURK")


# --- commands --------------------------------------------------------------------


@pytest.mark.parametrize("text", ["!uptime", "  !so @waddlebot", "!hi", "!bye now", "!lurker"])
def test_commands_are_skipped(text: str) -> None:
    assert decide(text) == TriggerDecision.skip("command")


@pytest.mark.parametrize("text", ["!lurk", "!LURK", "  !lurk see you", "!lurk @waddlebot"])
def test_lurk_is_a_farewell(text: str) -> None:
    assert decide(text) == TriggerDecision.reply(Trigger.FAREWELL)


def test_exclamation_without_word_is_not_a_command() -> None:
    assert decide("!!! hype hi").trigger is Trigger.GREETING
    assert decide("! wow").skip_reason == "no_trigger"


def test_empty_chat_message() -> None:
    assert decide("") == TriggerDecision.skip("empty_message")
    assert decide("  \n\t") == TriggerDecision.skip("empty_message")


# --- who is speaking -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "display_name", "metadata"),
    [
        ("waddlebot", None, {}),
        ("WaddleBot", "WaddleBot", {}),
        ("someone", "WADDLEBOT", {}),
        ("someone", "Someone", {"is_self": True}),
        ("someone", "Someone", {"bot_user_id": "u1"}),
    ],
)
def test_own_messages(username: str, display_name: str | None, metadata: dict[str, Any]) -> None:
    decision = decide(
        "hi @waddlebot?", username=username, display_name=display_name, metadata=metadata
    )
    assert decision == TriggerDecision.skip("own_message")


def test_bot_user_id_of_someone_else_is_not_own() -> None:
    assert decide("hi", metadata={"bot_user_id": "u999"}).trigger is Trigger.GREETING


@pytest.mark.parametrize(
    ("username", "metadata"),
    [
        ("nightbot", {}),
        ("StreamElements", {}),
        ("randombot", {"is_bot": True}),
        ("randombot", {"is_bot": "yes"}),
        ("randombot", {"is_bot": 1}),
    ],
)
def test_bot_messages(username: str, metadata: dict[str, Any]) -> None:
    decision = decide("hi @waddlebot", username=username, display_name=None, metadata=metadata)
    assert decision == TriggerDecision.skip("bot_message")


@pytest.mark.parametrize("flag", [False, "false", "0", "", None, 0, "no"])
def test_falsy_is_bot_flags(flag: Any) -> None:
    assert decide("hi", metadata={"is_bot": flag}).trigger is Trigger.GREETING


def test_bots_never_trigger_events() -> None:
    decision = decide(message_type=MessageType.RAID, username="nightbot")
    assert decision == TriggerDecision.skip("bot_message")


# --- events ----------------------------------------------------------------------


@pytest.mark.parametrize("message_type", sorted(EVENT_TYPES))
def test_each_event_type_is_answered(message_type: MessageType) -> None:
    decision = decide("", message_type=message_type)
    assert decision == TriggerDecision.reply(Trigger.EVENT)


def test_event_with_text_is_still_an_event() -> None:
    decision = decide("!uptime hi @waddlebot?", message_type=MessageType.RESUB)
    assert decision.trigger is Trigger.EVENT


def test_disabled_event_type() -> None:
    rules = TriggerRules(
        bot_name="waddlebot", answered_events=EVENT_TYPES - {MessageType.FOLLOW}
    )
    assert decide(message_type=MessageType.FOLLOW, rules=rules) == TriggerDecision.skip(
        "event_type_disabled"
    )
    assert decide(message_type=MessageType.RAID, rules=rules).trigger is Trigger.EVENT


def test_disabled_event_trigger() -> None:
    rules = TriggerRules(bot_name="waddlebot", enabled_triggers=DEFAULT_TRIGGERS - {Trigger.EVENT})
    assert decide(message_type=MessageType.RAID, rules=rules) == TriggerDecision.skip(
        "trigger_disabled"
    )


# --- disabled triggers ------------------------------------------------------------------


def test_disabled_trigger_falls_through_to_the_next_match() -> None:
    rules = TriggerRules(
        bot_name="waddlebot", enabled_triggers=frozenset({Trigger.GREETING, Trigger.MENTION})
    )
    assert decide("hi, how are you?", rules=rules).trigger is Trigger.GREETING
    assert decide("how are you?", rules=rules) == TriggerDecision.skip("trigger_disabled")
    assert decide("bye", rules=rules) == TriggerDecision.skip("trigger_disabled")
    assert decide("!lurk", rules=rules) == TriggerDecision.skip("trigger_disabled")
    assert decide("nice play", rules=rules) == TriggerDecision.skip("no_trigger")


def test_mention_is_answered_by_default_but_can_be_switched_off() -> None:
    assert decide("@waddlebot nice").trigger is Trigger.MENTION
    rules = TriggerRules(
        bot_name="waddlebot", enabled_triggers=DEFAULT_TRIGGERS - {Trigger.MENTION}
    )
    assert decide("@waddlebot nice", rules=rules) == TriggerDecision.skip("trigger_disabled")
    assert decide("@waddlebot hi", rules=rules).trigger is Trigger.GREETING


def test_proactive_is_never_detected_here() -> None:
    rules = TriggerRules(bot_name="waddlebot", enabled_triggers=frozenset(Trigger))
    assert decide("nice play", rules=rules) == TriggerDecision.skip("no_trigger")


# --- real chat, six languages -------------------------------------------------

GREETINGS_AS_TYPED = {
    "en": ["yo", "Yo chat!", "good morning", "Good Morning everyone", "goood mooorning",
           "morning all", "gm", "heya", "whats up chat", "what's up", "o/", "o7 o7", "hiiii",
           "helloooo", "wassup"],
    "es": ["hola", "Holaaa a todos", "buenas", "buenos días", "buenos dias chat",
           "buenas tardes", "qué tal gente", "saludos"],
    "pt": ["oi", "oiii gente", "olá", "ola pessoal", "e aí", "eai galera", "bom dia",
           "boa tarde", "salve salve"],
    "fr": ["bonjour", "Bonjour à tous", "bonsoir", "salut", "coucou tout le monde"],
    "de": ["hallo", "Hallo zusammen", "moin", "moin moin", "servus", "guten Morgen",
           "guten tag", "guten abend"],
    "it": ["ciao", "ciaooo a tutti", "buongiorno", "buonasera", "ehi"],
}
FAREWELLS_AS_TYPED = {
    "en": ["good night all", "gn", "gn chat", "goodnight", "good-night everyone",
           "see ya", "seeya", "see ya later", "peace out", "byeee", "ttyl", "gtg", "gotta go",
           "see you tomorrow", "see you soon", "later!"],
    "es": ["adiós", "adios amigos", "chao", "chau", "hasta luego", "hasta mañana",
           "nos vemos", "buenas noches"],
    "pt": ["tchau", "tchauzinho", "até logo", "ate mais", "boa noite", "falou galera"],
    "fr": ["au revoir", "bonne nuit", "à plus tard", "à demain", "bonne soirée"],
    "de": ["tschüss", "tschuss", "tschüs", "tschau", "auf wiedersehen", "gute nacht",
           "bis später", "bis dann", "bis morgen"],
    "it": ["arrivederci", "buona notte", "buonanotte", "a dopo", "ci vediamo", "a presto"],
}
# Each language's words where they are only letters inside other words, or
# everyday words of another meaning.
TRAPS = {
    "en": ["you", "your turn", "young", "sign here", "gnome", "design", "sunglasses",
           "yoga time", "toyota", "going home", "coin toss", "noise", "see you on stream",
           "peace and quiet", "morningstar", "the night is young",
           "gmail", "whatsoever", "ogtg", "\\o/ nice play", "golden"],
    "es": ["holanda", "holanda ganó", "adiosito", "chaos", "chaotic", "buenasooo x",
           "hastag", "nosotros vemos"],
    "pt": ["oitenta", "boiola", "tchauzao x", "olavo", "bombom dia", "ele falou que sim"],
    "fr": ["salutation", "saluting", "bonjournée", "coucouche", "au revoirs"],
    "de": ["hallowen", "halloween", "moinsen", "servusbus", "bist du da"],
    "it": ["ciaone", "ciaone proprio", "ehilà x", "piace e ai ragazzi", "cioa"],
}


def _cases(table: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(language, text) for language, texts in table.items() for text in texts]


@pytest.mark.parametrize(("language", "text"), _cases(GREETINGS_AS_TYPED))
def test_greetings_as_people_type_them(language: str, text: str) -> None:
    assert decide(text) == TriggerDecision.reply(Trigger.GREETING), (language, text)


@pytest.mark.parametrize(("language", "text"), _cases(FAREWELLS_AS_TYPED))
def test_farewells_as_people_type_them(language: str, text: str) -> None:
    assert decide(text) == TriggerDecision.reply(Trigger.FAREWELL), (language, text)


@pytest.mark.parametrize(("language", "text"), _cases(TRAPS))
def test_words_inside_other_words_never_fire(language: str, text: str) -> None:
    assert not is_greeting(text), (language, text)
    assert not is_farewell(text), (language, text)


def test_every_language_has_both_lists() -> None:
    from domain.triggers import FAREWELLS_BY_LANGUAGE, GREETINGS_BY_LANGUAGE

    for language in ("en", "es", "pt", "fr", "de", "it"):
        assert GREETINGS_BY_LANGUAGE[language], language
        assert FAREWELLS_BY_LANGUAGE[language], language


def test_a_community_replaces_the_lists_with_its_own() -> None:
    rules = TriggerRules(bot_name="waddlebot", greeting_words=("ahoy", "^waddle on"),
                         farewell_words=("fair winds",))
    assert decide("ahoyyy mates", rules=rules) == TriggerDecision.reply(Trigger.GREETING)
    assert decide("waddle on, friends", rules=rules) == TriggerDecision.reply(Trigger.GREETING)
    # "^": only as the first words of the line.
    assert decide("we waddle on", rules=rules) == TriggerDecision.skip("no_trigger")
    assert decide("fair winds all", rules=rules) == TriggerDecision.reply(Trigger.FAREWELL)
    # Its lists replace the built-in ones; !lurk stays a goodbye.
    assert decide("hello", rules=rules) == TriggerDecision.skip("no_trigger")
    assert decide("bye", rules=rules) == TriggerDecision.skip("no_trigger")
    assert decide("!lurk", rules=rules) == TriggerDecision.reply(Trigger.FAREWELL)
    # An empty list switches the trigger's words off.
    silent = TriggerRules(bot_name="waddlebot", greeting_words=())
    assert decide("hello", rules=silent) == TriggerDecision.skip("no_trigger")


# -- edges found by the mutation run (tests/README.md) ------------------------
# Rules are built inside each test: rules built at import time are out of the
# mutation run's reach (mutmut switches mutants on per call).


def test_bot_names_are_compared_without_at_signs_or_case() -> None:
    rules = TriggerRules(bot_name="@WaddleBot", known_bots=frozenset({"@NightBot"}))
    assert rules.is_other_bot(make_event("hi", username="nightbot", display_name=None))
    assert rules.is_other_bot(make_event("hi", username="@NIGHTBOT", display_name=None))
    assert not rules.is_other_bot(make_event("hi", username="nightbot@x", display_name=None))
    assert rules.is_own(make_event("hi", username="waddlebot", display_name=None))
    assert rules.mentions_bot(make_event("hey @WADDLEBOT what's up"))
    assert rules.mentions_bot(make_event("thanks waddlebot"))
    assert not rules.mentions_bot(make_event("@waddlebots are cool"))


def test_an_empty_bot_name_is_refused() -> None:
    with pytest.raises(ValueError, match="bot_name must not be empty"):
        TriggerRules(bot_name=" @ ")


def test_a_bot_known_only_by_its_display_name_is_a_bot() -> None:
    rules = TriggerRules(bot_name="waddlebot", known_bots=frozenset({"nightbot"}))
    assert rules.is_other_bot(make_event("hi", username="someone", display_name="NightBot"))


def test_names_starting_with_x_keep_their_x() -> None:
    rules = TriggerRules(bot_name="XenoBot", known_bots=frozenset({"XBot"}))
    assert rules.is_other_bot(make_event("hi", username="xbot", display_name=None))
    assert not rules.is_other_bot(make_event("hi", username="bot", display_name=None))
    assert rules.mentions_bot(make_event("hey @xenobot"))
    assert not rules.mentions_bot(make_event("hey @enobot"))


def test_a_communitys_own_words_stretch_and_take_an_optional_apostrophe() -> None:
    """A community's list gets the built-in lists' leniency: stretched letters,
    straight or curly apostrophes (or none), but never fewer letters than written."""
    rules = TriggerRules(bot_name="waddlebot", greeting_words=("what's good", "hello"))
    for text in ("what's good", "whats good", "what’s good chat", "whaaat's goood",
                 "hellooo", "HELLO there"):
        assert decide(text, rules=rules) == TriggerDecision.reply(Trigger.GREETING), text
    for text in ("helo", "what good", "wha's good"):
        assert decide(text, rules=rules) == TriggerDecision.skip("no_trigger"), text


def test_a_phrase_wins_over_the_other_lists_word_at_its_end_mid_line() -> None:
    """"buenas noches" keeps its "noches", wherever the phrase stands in the line."""
    rules = TriggerRules(bot_name="waddlebot", greeting_words=("noches",),
                         farewell_words=("buenas noches",))
    assert decide("ok ok buenas noches", rules=rules) == TriggerDecision.reply(Trigger.FAREWELL)
    assert decide("noches!", rules=rules) == TriggerDecision.reply(Trigger.GREETING)


def test_a_word_in_both_of_a_communitys_lists_still_triggers() -> None:
    """Neither match is inside the other when they are the same span: the line is
    answered (as a greeting, which comes first), never silenced by the overlap."""
    rules = TriggerRules(bot_name="waddlebot", greeting_words=("yo",), farewell_words=("yo",))
    assert decide("ok yo", rules=rules) == TriggerDecision.reply(Trigger.GREETING)


def test_blank_entries_in_a_communitys_list_match_nothing() -> None:
    rules = TriggerRules(bot_name="waddlebot", greeting_words=("", "  ", "ahoy"),
                         farewell_words=("",))
    # (An empty alternative would match between two non-letters, as in " :)".)
    assert decide("nice stream :)", rules=rules) == TriggerDecision.skip("no_trigger")
    assert decide("ahoy", rules=rules) == TriggerDecision.reply(Trigger.GREETING)
