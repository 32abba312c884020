"""Make model output fit to post in a live chat.

A model's text goes to a public channel as the bot's own words, with the
bot's permissions. It must therefore never leak the model's reasoning or our
prompt wrapper, never run a chat command (`/ban`, `!addcom`, `.timeout`),
never ping a whole server or workspace, and never exceed what the platform
accepts (an over-long message is rejected, not truncated, by most platforms).

Each rule is a small function of its own, so it can be tested (and reused by
the completions API) on its own; `make_safe` applies them in an order where no
later rule can undo an earlier one: text is first cut down to what the model
meant to say, then normalised, then defanged, then trimmed.

Decisions on the cases the brief leaves open:

* Our prompt escapes `&`, `<`, `>` and `"` in viewer text; a model that quotes
  a viewer echoes those entities ("&lt;3"), so they are turned back before the
  wrapper tags are stripped and before mentions are neutralised.
* Zero-width characters that only serve to hide things (U+200B, U+2060,
  U+FEFF, U+180E) and bidirectional controls are removed; U+200D (joins emoji
  such as families) and U+200C (needed by some scripts) are kept.
* Slack `<!channel>`, `<!here>`, `<!everyone>` become `@\u200bchannel` (etc.),
  the same harmless form as a plain `@everyone`; a subteam becomes `@team`.
* Links, when not allowed, are URLs with a scheme, `www.` hosts and bare
  hosts on common TLDs (`discord.gg/x`, `example.com`), which chat clients
  turn into links on their own; a trailing sentence mark stays in the text.
  Slack's `<https://x|label>` goes whole, label included.
* When the prefix leaves no room at all under the limit, the prefix is
  dropped rather than the reply.
* A reply the model stopped because it ran out of tokens (finish reason
  `length`, whichever provider) ends where the budget did, often mid-word.
  It keeps its whole sentences only; with none, nothing is posted.
* Small models parrot: they repeat a sentence until the length cap, or recite
  their own instructions ("The from attribute is only the viewer's display
  name."). A sentence already said in the reply goes, and so does one that
  shares a run of `PROMPT_ECHO_WORDS` words with the system prompt: the
  prompt is never to be revealed, and such a sentence is never a reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from domain.platforms import reply_limit
from schemas.events import Platform

ELLIPSIS = "…"
ZWSP = "\u200b"
LINK_PLACEHOLDER = "[link removed]"

_REASONING_TAG = r"(?:think|thinking|reasoning)"
_REASONING_BLOCK_RE = re.compile(
    rf"<{_REASONING_TAG}\b[^>]*>.*?</{_REASONING_TAG}\s*>", re.IGNORECASE | re.DOTALL
)
_REASONING_CLOSE_RE = re.compile(rf"</{_REASONING_TAG}\s*>", re.IGNORECASE)
_REASONING_OPEN_RE = re.compile(rf"<{_REASONING_TAG}\b[^>]*>", re.IGNORECASE)

_WRAPPER_TAG_RE = re.compile(r"</?\s*chat_message\b[^>]*>", re.IGNORECASE)
_PROMPT_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&amp;", "&"))

# Leading quotes or spaces, then command characters: `"/me`, ` .ban`, `!!cmd`.
_LEADING_COMMAND_RE = re.compile(r"^[\s\"'`“”‘’«»]*[!/.]+")

# Hidden or direction-changing characters: they can hide a command prefix or a
# mention from the rules below (and from a human moderator reading the log).
_INVISIBLE_RE = re.compile(
    "[\u200b\u2060\ufeff\u180e\u00ad\u202a-\u202e\u2066-\u2069"
    "\u0000-\u0008\u000e-\u001b\u007f-\u0084\u0086-\u009f]"
)
_WHITESPACE_RE = re.compile(r"\s+")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?…])\s+")
# The end of a sentence: its mark, then any closing quotes or brackets.
_FINISHED_SENTENCE_RE = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)")
_WORD_RE = re.compile(r"[\w']+")
PROMPT_ECHO_WORDS = 7

_DISCORD_USER_RE = re.compile(r"<@!?\d+>")
_DISCORD_ROLE_RE = re.compile(r"<@&\d+>")
_DISCORD_CHANNEL_RE = re.compile(r"<#\d+>")
_SLACK_USER_RE = re.compile(r"<@[UW][A-Z0-9]+(?:\|[^>]*)?>")
_SLACK_SPECIAL_RE = re.compile(r"<!(\w+)(?:\^[^>|]*)?(?:\|[^>]*)?>")
_MASS_MENTION_RE = re.compile(r"@(everyone|here|channel)(?!\w)", re.IGNORECASE)
_SLACK_BROADCASTS = frozenset({"channel", "here", "everyone"})

_COMMON_TLDS = (
    "com|net|org|io|gg|tv|co|me|ly|xyz|app|dev|link|info|biz|live|stream|ru|uk|de"
)
_URL_RE = re.compile(
    r"(?:(?:(?:https?|ftp)://|www\.)[^\s<>]+?"
    r"|(?<![\w@.])(?:[a-z0-9-]+\.)+(?:" + _COMMON_TLDS + r")(?:/[^\s<>]*?)?)"
    # Stop before trailing sentence marks: "see example.com." keeps its full stop.
    r"(?=[.,!?;:)\]'\"]*(?:[\s<>|]|$))",
    re.IGNORECASE,
)
# Slack's own link markup, `<https://x|label>`: the label goes with the link.
_SLACK_LINK_RE = re.compile(r"<(?:https?|ftp|mailto):[^<>]*>", re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """Reasoning models think out loud; none of that is meant for chat.

    A closed block is cut out; a stray closing tag means the opening was lost
    (a truncated stream), so everything before it was reasoning; an unclosed
    opening tag means the answer never came, so everything after it goes.
    """
    text = _REASONING_BLOCK_RE.sub(" ", text)
    closers = list(_REASONING_CLOSE_RE.finditer(text))
    if closers:
        text = text[closers[-1].end() :]
    opener = _REASONING_OPEN_RE.search(text)
    if opener is not None:
        text = text[: opener.start()]
    return text


def drop_unfinished_sentence(text: str) -> str:
    """A reply cut by the token limit keeps its whole sentences; "" when it has none.

    Chat must never show a reply that stops mid-word ("Welcome to the str").
    """
    end = -1
    for match in _FINISHED_SENTENCE_RE.finditer(text):
        end = match.end()
    return text[:end] if end > 0 else ""


def strip_prompt_wrapper(text: str) -> str:
    """A model that quotes the viewer echoes our wrapper and its escapes; chat must see neither."""
    for entity, char in _PROMPT_ENTITIES:
        text = text.replace(entity, char)
    return _WRAPPER_TAG_RE.sub(" ", text)


def collapse_whitespace(text: str) -> str:
    """Chat is one line; invisible characters could hide a command or a mention from later rules."""
    text = _INVISIBLE_RE.sub("", text)
    return _WHITESPACE_RE.sub(" ", text).strip()


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("’", "'"))


def _runs(words: Sequence[str], size: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + size]) for i in range(len(words) - size + 1)}


@lru_cache(maxsize=64)
def _prompt_runs(prompt: str) -> frozenset[tuple[str, ...]]:
    """A community's system prompts are few (per trigger and platform): shingle each once."""
    return frozenset(_runs(_words(prompt), PROMPT_ECHO_WORDS))


def drop_parroting(text: str, prompt: str = "") -> str:
    """Drop sentences said twice in one reply, and sentences that recite the prompt."""
    prompt_runs = _prompt_runs(prompt) if prompt else frozenset()
    seen: set[tuple[str, ...]] = set()
    kept: list[str] = []
    for sentence in _SENTENCE_END_RE.split(text):
        words = tuple(_words(sentence))
        if words and words in seen:
            continue
        if prompt_runs and not prompt_runs.isdisjoint(_runs(words, PROMPT_ECHO_WORDS)):
            continue
        if words:
            seen.add(words)
        kept.append(sentence)
    return " ".join(kept)


def remove_links(text: str) -> str:
    """Some communities forbid links; a link from a model is never vetted by anyone."""
    text = _SLACK_LINK_RE.sub(LINK_PLACEHOLDER, text)
    return _URL_RE.sub(LINK_PLACEHOLDER, text)


def neutralise_mentions(text: str) -> str:
    """The bot may have permission to ping everyone; a model or a viewer must not borrow it."""
    text = _DISCORD_ROLE_RE.sub("@role", text)
    text = _DISCORD_USER_RE.sub("@user", text)
    text = _DISCORD_CHANNEL_RE.sub("#channel", text)
    text = _SLACK_USER_RE.sub("@user", text)
    text = _SLACK_SPECIAL_RE.sub(_slack_special, text)
    return _MASS_MENTION_RE.sub(lambda m: f"@{ZWSP}{m.group(1)}", text)


def _slack_special(match: re.Match[str]) -> str:
    name = match.group(1).lower()
    if name in _SLACK_BROADCASTS:
        return f"@{ZWSP}{name}"
    if name == "subteam":
        return "@team"
    return ""  # dates, links and anything newer: nothing a viewer needs to see


def strip_leading_commands(text: str) -> str:
    """A line the bot posts that starts with `/`, `!` or `.` would run as a command."""
    while True:
        match = _LEADING_COMMAND_RE.match(text)
        if match is None:
            return text.strip()
        text = text[match.end() :]


def trim_to_limit(text: str, limit: int) -> str:
    """Platforms reject, not cut, over-long messages; cut on a word so the reply still reads."""
    if limit < 1:
        return ""
    if len(text) <= limit:
        return text
    # A whole sentence reads better than a cut one: end at the last sentence
    # that fits, when that keeps at least 60% of what would fit.
    sentence_end = max(text.rfind(mark, 0, limit) for mark in (". ", "! ", "? "))
    if sentence_end >= 0.6 * limit:
        return text[: sentence_end + 1]
    room = limit - len(ELLIPSIS)
    if room < 1:
        return text[:limit]
    cut = room
    if text[room] != " ":
        space = text.rfind(" ", 0, room)
        word_end = text.find(" ", room)
        word_len = (len(text) if word_end == -1 else word_end) - (space + 1)
        # A word longer than the whole budget can never fit: cut through it.
        if space > 0 and word_len <= limit:
            cut = space
    head = text[:cut].rstrip(" ,;:-\u200d" + ZWSP)
    if not head:
        head = text[:room]
    return head + ELLIPSIS


def make_safe(
    text: str,
    platform: Platform,
    *,
    prefix: str = "",
    max_chars: int | None = None,
    allow_links: bool = True,
    blocked_words: Sequence[str] = (),
    prompt: str = "",
    truncated: bool = False,
) -> str:
    """The one door between a model and a chat: "" means there is nothing fit to post.

    `prompt` is the system message the model was given: sentences reciting it are dropped.
    `truncated`: the model was stopped by its token limit (`Completion.truncated`),
    so its last sentence is unfinished and goes.
    """
    limit = reply_limit(platform, max_chars)
    text = strip_reasoning(text)
    text = strip_prompt_wrapper(text)
    text = collapse_whitespace(text)
    if truncated:
        text = drop_unfinished_sentence(text)
    text = drop_parroting(text, prompt)
    if not allow_links:
        text = remove_links(text)
    if blocked_words:
        text = mask_blocked_words(text, blocked_words)
    text = neutralise_mentions(text)
    text = strip_leading_commands(text)
    if not text:
        return ""
    if len(prefix) >= limit:
        prefix = ""
    return prefix + trim_to_limit(text, limit - len(prefix))


BLOCKED_MASK = "***"


@lru_cache(maxsize=256)
def _blocked_pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex per community list, compiled once: the list changes rarely."""
    cleaned = sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)
    if not cleaned:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, cleaned)) + r")(?!\w)",
                      re.IGNORECASE)


def contains_blocked_word(text: str, words: Sequence[str]) -> bool:
    """A community's blocked words, as whole words, in any case."""
    pattern = _blocked_pattern(tuple(words))
    return pattern is not None and pattern.search(text) is not None


def mask_blocked_words(text: str, words: Sequence[str]) -> str:
    """The model may still say what the community banned: never let it reach chat."""
    pattern = _blocked_pattern(tuple(words))
    return text if pattern is None else pattern.sub(BLOCKED_MASK, text)


__all__ = [
    "BLOCKED_MASK",
    "ELLIPSIS",
    "LINK_PLACEHOLDER",
    "ZWSP",
    "collapse_whitespace",
    "contains_blocked_word",
    "drop_unfinished_sentence",
    "make_safe",
    "mask_blocked_words",
    "neutralise_mentions",
    "remove_links",
    "strip_leading_commands",
    "strip_prompt_wrapper",
    "strip_reasoning",
    "trim_to_limit",
]
