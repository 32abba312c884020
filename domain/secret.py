"""A secret value that cannot leak by accident, and how it is shown on screen.

A leaf: a community profile carries its provider key as a `Secret`, and the
providers receive one, so the type lives below both (the keys' encryption at
rest stays in `config.secrets`).
"""

from __future__ import annotations

import hmac

_ELLIPSIS = "…"


def mask(value: str | None) -> str:
    """Enough to tell two keys apart on screen, too little to use or guess one."""
    if not value:
        return ""
    if len(value) >= 16:
        return f"{value[:3]}{_ELLIPSIS}{value[-4:]}"
    if len(value) >= 8:
        return f"{_ELLIPSIS}{value[-2:]}"
    return _ELLIPSIS


class Secret:
    """A plain secret that only `reveal()` gives back, so it cannot leak by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def masked(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.masked!r})"

    def __str__(self) -> str:
        return self.masked

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the plain key somewhere (a cache, a queue): refuse.
        raise TypeError("a Secret cannot be pickled")
