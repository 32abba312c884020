"""Whether an interaction event deserves a reply, and why.

The worker sees every chat line of every channel; answering all of them would
flood chat and burn provider capacity, so only lines that plainly ask for the
bot (a mention, a question, a greeting, a goodbye) or celebrate something (a
subscription, a raid, ...) are answered. The decision is a pure function of the
event and the rules so that it is cheap (no I/O on the hot path) and trivially
testable.

Decisions on the cases the contract leaves open:

* Order of checks: own message > other bots > event types > empty text >
  commands > chat triggers. A bot (or the bot itself) is never answered, even
  when it raises an event, so two bots can never talk to each other forever.
* Among chat triggers the priority is mention > question > greeting >
  farewell. When the best match is disabled the next enabled match is used;
  only when every match is disabled is the event skipped with
  `trigger_disabled` (nothing matching at all is `no_trigger`).
* A mention is answered by default because `Trigger.MENTION` is in the default
  `enabled_triggers`; an operator who explicitly removes it is obeyed.
* `Trigger.PROACTIVE` is never returned here: joining a conversation
  unprompted needs a rate or a chance, which is the pipeline's call.
* `!word` is a command for another bot, except `!lurk`, which is a goodbye.
  `!` followed by no word character ("!!!", "! wow") is excitement, not a
  command. A mention inside a command ("!so @waddlebot") is still a command.
* Greeting and farewell words match on word boundaries, case-insensitively,
  and any letter may be stretched the way chat writes ("heyyy", "hiii",
  "helloooo", "byeee"), so "this", "which", "they", "support", "history",
  "shipping", "sushi", "ohio", "superb" and "heyday" never fire.
  A doubled word counts too ("byebye", "hihi").
* "later" is an everyday word ("I'll do it later"), so it counts as a goodbye
  only as the first word of the line or in "see you/ya/u later",
  "catch you/ya/u later".
* A question is a question mark (`?`, `？`, `؟`, `¿`) outside a URL (a query
  string is not a question) in a line that has at least one letter or digit
  ("???" alone is not a question).
* Metadata flags (`is_bot`, `mentions_bot`, `is_self`) come from JSON written
  by several routers, so the strings "true"/"1"/"yes" count as true and
  "false"/"0"/"no"/"" as false.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.events import InteractionEvent, MessageType
from schemas.replies import Trigger

SkipReason = Literal[
    "own_message",  # the bot's own line echoed back by the platform
    "bot_message",  # another bot (metadata `is_bot` or a name in `known_bots`)
    "event_type_disabled",  # a non-chat event whose type is not answered here
    "empty_message",  # a chat line with nothing but whitespace
    "command",  # `!word`: meant for another bot
    "no_trigger",  # an ordinary chat line nobody asked us about
    "trigger_disabled",  # something matched, but that trigger is switched off
]

DEFAULT_TRIGGERS: frozenset[Trigger] = frozenset(
    {Trigger.GREETING, Trigger.FAREWELL, Trigger.QUESTION, Trigger.MENTION, Trigger.EVENT}
)
EVENT_TYPES: frozenset[MessageType] = frozenset(MessageType) - {MessageType.CHAT_MESSAGE}

# Greetings and farewells as chat types them, by language. A phrase's words may
# be run together or hyphenated ("goodnight", "good-night"); accents are
# optional ("adios" = "adiós", "tschuss" = "tschüss"); any letter may be
# stretched. A leading "^" means "only as the first word of the line", for
# words that are also everyday words elsewhere ("later", "yo" in Spanish).
GREETINGS_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": ("hi", "hello", "hey", "heya", "heyo", "howdy", "hiya", "sup", "wassup",
           "what's up", "greetings", "^yo", "good morning", "good afternoon",
           "good evening", "^morning", "gm", "o7", "o/"),
    "es": ("hola", "buenas", "buenos dias", "buenas tardes", "que tal", "saludos"),
    "pt": ("oi", "ola", "^e ai", "bom dia", "boa tarde", "salve"),
    "fr": ("bonjour", "bonsoir", "salut", "coucou"),
    "de": ("hallo", "moin", "servus", "guten morgen", "guten tag", "guten abend"),
    "it": ("ciao", "buongiorno", "buonasera", "ehi"),
}
FAREWELLS_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": ("bye", "goodbye", "cya", "see ya", "see you soon", "see you tomorrow",
           "see you later", "see ya later", "see u later", "catch you later",
           "catch ya later", "catch u later", "^later", "good night", "gn", "gnight",
           "nite", "peace out", "ttyl", "gtg", "g2g", "gotta go", "farewell"),
    "es": ("adios", "chao", "chau", "hasta luego", "hasta manana", "hasta pronto",
           "nos vemos", "buenas noches"),
    "pt": ("tchau", "tchauzinho", "ate logo", "ate mais", "ate amanha", "boa noite", "^falou"),
    "fr": ("au revoir", "bonne nuit", "a plus tard", "a demain", "bonne soiree"),
    "de": ("tschuss", "tschus", "tschuess", "tschau", "auf wiedersehen", "gute nacht", "bis dann",
           "bis spater", "bis spaeter", "bis morgen"),
    "it": ("arrivederci", "buona notte", "a dopo", "ci vediamo", "a presto"),
}
GREETING_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(w for words in GREETINGS_BY_LANGUAGE.values() for w in words))
FAREWELL_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(w for words in FAREWELLS_BY_LANGUAGE.values() for w in words))

_TRUE_STRINGS = frozenset({"true", "1", "yes", "y", "on"})


def fold(text: str) -> str:
    """Case and accents away: "Adiós" and "adios" are one word to match."""
    folded = text.casefold()
    if folded.isascii():
        return folded
    decomposed = unicodedata.normalize("NFKD", folded)
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def _stretchable(word: str) -> str:
    """Chat stretches words ("heyyy", "hellooo"): let every letter repeat.

    An apostrophe is optional ("whats up"), and so is the space or hyphen
    between a phrase's words ("goodnight", "good-night").
    """
    parts = []
    for piece in fold(word).split():
        pattern = []
        # A run of one letter is one quantified atom ("ee" -> `e{2,}`, not `e+e+`):
        # stacked `+`s on one letter backtrack exponentially on "seeeee…x".
        for char, run in itertools.groupby(piece):
            if char in "'\u2019":
                pattern.append("['\u2019]*")
                continue
            count = len(list(run))
            pattern.append(re.escape(char) + ("+" if count == 1 else f"{{{count},}}"))
        parts.append("".join(pattern))
    return r"[\s\-]*".join(parts)


def _word_alternation(words: Iterable[str]) -> str:
    # Longest first, so "hiya" is tried before "hi" (either way the match is bounded).
    parts = [_stretchable(word) for word in sorted(words, key=len, reverse=True)]
    return "(?:" + "|".join(parts) + ")"


# `(?<!\w)` / `(?!\w)` rather than `\b`: they behave the same for words made of
# word characters, and stay correct for words that start or end with
# punctuation ("o/"). A backslash before counts as part of the word, so the
# cheer "\o/" is not the wave "o/". `(?:...)+` lets a doubled word ("byebye") count.
def compile_words(words: Iterable[str], *, extra: str = "") -> re.Pattern[str]:
    """One pattern for a list of words (see the module docstring); matched on `fold(text)`."""
    anywhere = [w.strip() for w in words if w.strip() and not w.strip().startswith("^")]
    first = [w.strip()[1:].strip() for w in words if w.strip().startswith("^")]
    branches = []
    if anywhere:
        branches.append(rf"(?<![\w\\])(?:{_word_alternation(anywhere)}[\s\-]*)+(?<![\s\-])"
                        rf"(?!\w)")
    if any(first):
        branches.append(rf"^\W*{_word_alternation(w for w in first if w)}(?!\w)")
    if extra:
        branches.append(extra)
    return re.compile("|".join(branches) or r"(?!)")


_GREETING_RE = compile_words(GREETING_WORDS)
_FAREWELL_RE = compile_words(FAREWELL_WORDS, extra=r"(?<![\w!])!lurk(?!\w)")
_URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_COMMAND_RE = re.compile(r"^\s*!(\w+)")
_HAS_WORD_RE = re.compile(r"\w")


def _truthy(value: Any) -> bool:
    """Metadata flags arrive as JSON from several routers: `"false"` must be false."""
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_STRINGS
    if isinstance(value, bool | int | float):
        return bool(value)
    return False


def _norm_name(name: str | None) -> str:
    return (name or "").strip().lstrip("@").casefold()


@dataclass(frozen=True)
class TriggerRules:
    """What this deployment (or community) answers; build once, reuse for every event."""

    bot_name: str
    known_bots: frozenset[str] = frozenset()
    enabled_triggers: frozenset[Trigger] = DEFAULT_TRIGGERS
    answered_events: frozenset[MessageType] = EVENT_TYPES
    # A community's own lists replace the defaults (config: greeting_words, farewell_words).
    greeting_words: tuple[str, ...] = GREETING_WORDS
    farewell_words: tuple[str, ...] = FAREWELL_WORDS
    # Compiled once here, never per event: the hot path only runs them.
    _mention_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    greeting_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    farewell_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _bot_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = self.bot_name.strip().lstrip("@")
        if not name:
            raise ValueError("bot_name must not be empty")
        # Callers may hand in "NightBot" or "@nightbot"; compare on one spelling.
        object.__setattr__(
            self, "known_bots", frozenset(_norm_name(bot) for bot in self.known_bots)
        )
        object.__setattr__(self, "_bot_key", name.casefold())
        object.__setattr__(self, "greeting_re", _GREETING_RE if (
            self.greeting_words == GREETING_WORDS) else compile_words(self.greeting_words))
        object.__setattr__(self, "farewell_re", _FAREWELL_RE if (
            self.farewell_words == FAREWELL_WORDS) else compile_words(
                self.farewell_words, extra=r"(?<![\w!])!lurk(?!\w)"))
        object.__setattr__(
            self,
            "_mention_re",
            re.compile(rf"(?<![\w@])@?{re.escape(name)}(?!\w)", re.IGNORECASE),
        )

    def is_own(self, event: InteractionEvent) -> bool:
        meta = event.metadata
        return (
            _norm_name(event.username) == self._bot_key
            or _norm_name(event.display_name) == self._bot_key
            or _truthy(meta.get("is_self"))
            or _metadata_names_user(meta.get("bot_user_id"), event.user_id)
        )

    def is_other_bot(self, event: InteractionEvent) -> bool:
        return (
            _truthy(event.metadata.get("is_bot"))
            or _norm_name(event.username) in self.known_bots
            or _norm_name(event.display_name) in self.known_bots
        )

    def mentions_bot(self, event: InteractionEvent) -> bool:
        return _truthy(event.metadata.get("mentions_bot")) or bool(
            self._mention_re.search(event.message_content)
        )


def _metadata_names_user(value: Any, user_id: str) -> bool:
    # The router may tell us the bot's own platform id; a number or a string.
    return isinstance(value, str | int) and not isinstance(value, bool) and str(value) == user_id


@dataclass(frozen=True)
class TriggerDecision:
    """Exactly one of `trigger` (answer, and why) or `skip_reason` (don't, and why)."""

    trigger: Trigger | None = None
    skip_reason: SkipReason | None = None

    def __post_init__(self) -> None:
        if (self.trigger is None) == (self.skip_reason is None):
            raise ValueError("a decision has either a trigger or a skip reason, not both")

    @property
    def answer(self) -> bool:
        return self.trigger is not None

    @classmethod
    def reply(cls, trigger: Trigger) -> TriggerDecision:
        return cls(trigger=trigger)

    @classmethod
    def skip(cls, reason: SkipReason) -> TriggerDecision:
        return cls(skip_reason=reason)


# The question marks chat is typed with: ASCII, the full-width one of Chinese
# and Japanese input, Arabic's, and Spanish's opening mark (often the only one).
_QUESTION_MARKS = ("?", "\uff1f", "\u061f", "\u00bf")


def is_question(text: str) -> bool:
    """A `?` in a URL's query string is not a question; "???" alone is not one either."""
    without_urls = _URL_RE.sub(" ", text)
    return (any(mark in without_urls for mark in _QUESTION_MARKS)
            and bool(_HAS_WORD_RE.search(without_urls)))


def is_greeting(text: str) -> bool:
    """With the default lists; a community's own lists live in its `TriggerRules`."""
    return bool(_GREETING_RE.search(fold(text)))


def is_farewell(text: str) -> bool:
    return bool(_FAREWELL_RE.search(fold(text)))


def chat_triggers(event: InteractionEvent, rules: TriggerRules) -> list[Trigger]:
    """All matches, best first, so a disabled trigger can fall through to the next one."""
    text = event.message_content
    found: list[Trigger] = []
    if rules.mentions_bot(event):
        found.append(Trigger.MENTION)
    if is_question(text):
        found.append(Trigger.QUESTION)
    folded = fold(text)
    greeting = rules.greeting_re.search(folded)
    farewell = rules.farewell_re.search(folded)
    # A word inside a longer phrase of the other list is that phrase's:
    # "buenas noches" is a goodbye, though "buenas" alone is a hello.
    if greeting and not (farewell and _inside(greeting, farewell)):
        found.append(Trigger.GREETING)
    if farewell and not (greeting and _inside(farewell, greeting)):
        found.append(Trigger.FAREWELL)
    return found


def _inside(short: re.Match[str], long: re.Match[str]) -> bool:
    return (long.start() <= short.start() and short.end() <= long.end()
            and long.end() - long.start() > short.end() - short.start())


def detect_trigger(event: InteractionEvent, rules: TriggerRules) -> TriggerDecision:
    """Pure and cheap: it runs on every chat line before any state or provider is touched."""
    if rules.is_own(event):
        return TriggerDecision.skip("own_message")
    if rules.is_other_bot(event):
        return TriggerDecision.skip("bot_message")

    if event.message_type is not MessageType.CHAT_MESSAGE:
        if event.message_type not in rules.answered_events:
            return TriggerDecision.skip("event_type_disabled")
        return _enabled([Trigger.EVENT], rules.enabled_triggers)

    text = event.message_content
    if not text.strip():
        return TriggerDecision.skip("empty_message")
    command = _COMMAND_RE.match(text)
    if command is not None:
        if command.group(1).lower() == "lurk":
            return _enabled([Trigger.FAREWELL], rules.enabled_triggers)
        return TriggerDecision.skip("command")

    found = chat_triggers(event, rules)
    if not found:
        return TriggerDecision.skip("no_trigger")
    return _enabled(found, rules.enabled_triggers)


def _enabled(found: list[Trigger], enabled: frozenset[Trigger]) -> TriggerDecision:
    for trigger in found:
        if trigger in enabled:
            return TriggerDecision.reply(trigger)
    return TriggerDecision.skip("trigger_disabled")


__all__ = [
    "DEFAULT_TRIGGERS",
    "EVENT_TYPES",
    "FAREWELLS_BY_LANGUAGE",
    "FAREWELL_WORDS",
    "GREETINGS_BY_LANGUAGE",
    "GREETING_WORDS",
    "SkipReason",
    "TriggerDecision",
    "TriggerRules",
    "chat_triggers",
    "compile_words",
    "detect_trigger",
    "fold",
    "is_farewell",
    "is_greeting",
    "is_question",
]
