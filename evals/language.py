"""Which language a reply is in, by `lingua-language-detector`.

Word lists guess badly on chat ("hola" is also a name, "die" is English too);
lingua's n-gram models are built for short text and ship inside its wheel (a
compiled extension), so nothing is downloaded when the suite runs (the README
says how that was checked, and `tests/test_evals_checks.py` runs it with no
network). The detector is restricted to the languages chat here is likely to
be in, which makes short texts far more reliable than choosing among 75.
"""

from __future__ import annotations

import re

from lingua import Language, LanguageDetector, LanguageDetectorBuilder

# ISO 639-1 codes the suite knows; the scenarios use a subset.
LANGUAGES: tuple[str, ...] = (
    "en", "es", "pt", "fr", "de", "it", "nl", "pl", "ru", "tr", "ja", "ko", "zh",
)
# Below this many letters, a text's language is not worth guessing ("gg", "o7").
MIN_LETTERS = 12

_NOT_PROSE_RE = re.compile(
    r"(?:https?://\S+|www\.\S+|[@#]\w+|\b[A-Z][a-z]+[A-Z]\w*\b|\b[A-Z]{3,}\b|\b\w*\d\w*\b)"
)

_WIDE_SCRIPT_RE = re.compile("[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


class LanguageDetectorError(LookupError):
    pass


def _language(code: str) -> Language:
    for language in Language.all():
        if language.iso_code_639_1.name.lower() == code:
            return language
    raise LanguageDetectorError(f"lingua has no language with the ISO 639-1 code {code!r}")


class Detector:
    """One lingua detector for the run.

    Its models are loaded when it is built (a second or two), not at the first
    reply: a lazy load would stall the event loop while replies are being timed.
    """

    def __init__(self, codes: tuple[str, ...] = LANGUAGES) -> None:
        self._detector: LanguageDetector = LanguageDetectorBuilder.from_languages(
            *(_language(code) for code in codes)).with_preloaded_language_models().build()

    @staticmethod
    def prose(text: str, *, drop: tuple[str, ...] = ()) -> str:
        """The text without what says nothing of its language: names, emotes, links, numbers."""
        for word in drop:
            if word:
                text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", text,
                              flags=re.IGNORECASE)
        return _NOT_PROSE_RE.sub(" ", text)

    def detect(self, text: str, *, drop: tuple[str, ...] = ()) -> str | None:
        """The ISO 639-1 code of `text`'s language, or None when it is too short to tell."""
        prose = self.prose(text, drop=drop)
        # A kana, hangul or han character says as much as a word: it counts thrice.
        weight = sum(3 if _WIDE_SCRIPT_RE.match(ch) else 1 for ch in prose if ch.isalpha())
        if weight < MIN_LETTERS:
            return None
        found = self._detector.detect_language_of(prose)
        return None if found is None else found.iso_code_639_1.name.lower()
