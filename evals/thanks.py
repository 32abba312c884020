"""What a thank-you for an event must say: who, and the facts that make it theirs.

The facts come from the event's metadata, the way the router sends them, so
one rule holds for every event: a cheer names its bits, a resub its months,
a sub its tier *name* (Twitch sends `1000`; viewers say "Tier 1"), a raid its
viewers, a donation its amount and currency. Each fact is a set of patterns,
since "1,500", "1500" and "1.500" are the same bits, and "€", "EUR" and
"euros" the same currency.

Decisions the brief leaves open:

* A first month (`months: 1`) is not a fact worth saying; from 2 on it is.
* Small numbers may be spelled out (English and the languages of the
  scenarios, up to twelve): "three months" is as right as "3 months".
* A gift count is a fact; a follow, a boost or a join has none beyond the name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.events import MessageType

# Words that thank or welcome, in the scenarios' languages (matched as word starts).
GRATITUDE = (
    "thank", "thx", "ty", "appreciat", "welcome", "congrat", "hype", "shout",
    "gracias", "bienvenid", "danke", "willkommen", "merci", "bienvenue", "obrigad",
    "valeu", "bem-vind", "grazie", "benvenut", "ありがとう", "ようこそ",
)

NUMBER_WORDS: Mapping[int, tuple[str, ...]] = {
    1: ("one", "uno", "eins", "une"),
    2: ("two", "dos", "zwei", "deux", "dois", "due"),
    3: ("three", "tres", "drei", "trois", "três", "tre"),
    4: ("four", "cuatro", "vier", "quatre", "quatro", "quattro"),
    5: ("five", "cinco", "fünf", "cinq", "cinque"),
    6: ("six", "seis", "sechs", "sei"),
    7: ("seven", "siete", "sieben", "sept", "sete", "sette"),
    8: ("eight", "ocho", "acht", "huit", "oito", "otto"),
    9: ("nine", "nueve", "neun", "neuf", "nove"),
    10: ("ten", "diez", "zehn", "dix", "dez", "dieci"),
    11: ("eleven", "once", "elf", "onze", "undici"),
    12: ("twelve", "doce", "zwölf", "douze", "doze", "dodici"),
}

TIER_NAMES: Mapping[str, str] = {"1000": "1", "2000": "2", "3000": "3"}
TIER_ROMAN: Mapping[str, str] = {"1": "i", "2": "ii", "3": "iii"}

CURRENCY_MARKS: Mapping[str, tuple[str, ...]] = {
    "USD": (r"\$", r"\busd\b", r"\bdollars?\b", r"\bbucks?\b"),
    "EUR": ("€", r"\beur\b", r"\beuros?\b"),
    "GBP": ("£", r"\bgbp\b", r"\bpounds?\b", r"\bquid\b"),
    "JPY": ("¥", "円", r"\bjpy\b", r"\byen\b"),
    "BRL": (r"r\$", r"\bbrl\b", r"\breais\b", r"\breal\b"),
    "CAD": (r"\$", r"\bcad\b", r"\bdollars?\b"),
    "AUD": (r"\$", r"\baud\b", r"\bdollars?\b"),
    "MXN": (r"\$", r"\bmxn\b", r"\bpesos?\b"),
}


@dataclass(frozen=True)
class Fact:
    """One thing the reply must say, as the patterns any of which says it."""

    label: str
    patterns: tuple[str, ...]

    def found_in(self, text: str) -> bool:
        return any(re.search(p, text, re.IGNORECASE) for p in self.patterns)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def number_patterns(n: int) -> tuple[str, ...]:
    """`n` as chat writes it: digits with or without thousands separators, small ones spelled."""
    digits = str(n)
    groups: list[str] = []
    while digits:
        groups.insert(0, digits[-3:])
        digits = digits[:-3]
    separated = r"[,. \u202f]?".join(groups)
    patterns = [rf"(?<![\d.,]){separated}(?![\d]|[.,]\d)"]
    if n >= 1000 and n % 100 == 0:
        patterns.append(rf"(?<![\d.,]){n / 1000:g}\s?k\b".replace(".", r"[.,]"))
    patterns.extend(rf"\b{word}\b" for word in NUMBER_WORDS.get(n, ()))
    return tuple(patterns)


def amount_patterns(value: Any) -> tuple[str, ...]:
    """An amount: 5 is "5", "5.00" or "5,00"; 2.5 is "2.5", "2.50" or "2,50"."""
    whole = _int(value)
    if whole is not None:
        base = number_patterns(whole)
        return (*base, rf"(?<![\d.,]){whole}[.,]00(?!\d)")
    if isinstance(value, float) and math.isfinite(value):
        text = f"{value:.2f}"
        head, cents = text.split(".")
        short = cents.rstrip("0")
        return (rf"(?<![\d.,]){head}[.,]{cents}(?!\d)",
                rf"(?<![\d.,]){head}[.,]{short}(?!\d)")
    return ()


def tier_fact(tier: Any) -> Fact | None:
    text = str(tier).strip()
    if text.lower() == "prime":
        return Fact("tier Prime", (r"\bprime\b",))
    number = TIER_NAMES.get(text)
    if number is None:
        return None
    words = NUMBER_WORDS[int(number)]
    name = rf"(?:{number}|{TIER_ROMAN[number]}|{'|'.join(words)})"
    return Fact(f"tier {number}", (rf"\b(?:tier|nivel|stufe|niveau|livello)\s*-?\s*{name}\b",))


def expected_facts(message_type: MessageType, metadata: Mapping[str, Any]) -> list[Fact]:
    """The facts a thank-you for this event must mention; [] for chat lines."""
    facts: list[Fact] = []
    if message_type is MessageType.CHAT_MESSAGE:
        return facts
    bits = _int(metadata.get("bits"))
    if bits is not None:
        facts.append(Fact(f"{bits} bits", number_patterns(bits)))
    viewers = _int(metadata.get("viewers"))
    if viewers is not None:
        facts.append(Fact(f"{viewers} viewers", number_patterns(viewers)))
    months = _int(metadata.get("months"))
    if months is not None and months >= 2:
        facts.append(Fact(f"{months} months", number_patterns(months)))
    if "tier" in metadata:
        tier = tier_fact(metadata["tier"])
        if tier is not None:
            facts.append(tier)
    count = _int(metadata.get("count", metadata.get("gifts")))
    if count is not None:
        facts.append(Fact(f"{count} gifts", number_patterns(count)))
    if "amount" in metadata:
        patterns = amount_patterns(metadata["amount"])
        if patterns:
            facts.append(Fact(f"amount {metadata['amount']}", patterns))
        currency = str(metadata.get("currency", "")).upper()
        marks = CURRENCY_MARKS.get(currency, (rf"\b{re.escape(currency)}\b",) if currency else ())
        if marks:
            facts.append(Fact(f"currency {currency}", marks))
    return facts


def names_viewer(text: str, names: tuple[str, ...]) -> bool:
    """The display name (or login) appears, whole, in any case; `@name` counts too."""
    for name in names:
        name = name.strip().lstrip("@")
        if name and re.search(rf"(?<![\w]){re.escape(name)}(?!\w)", text, re.IGNORECASE):
            return True
    return False


def thanks_word(text: str) -> bool:
    lowered = text.lower()
    return any(re.search(rf"(?<!\w){re.escape(word)}", lowered) for word in GRATITUDE)
