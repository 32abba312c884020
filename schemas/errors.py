"""The root of every exception this package raises: `except WaddleError` catches ours only.

At the bottom layer so every package's exceptions can derive from it, the
wire contract's own (`EventError`) included. Exceptions that were a
`ValueError` or `RuntimeError` stay one too (they derive from both), so no
caller's `except` changes meaning.
"""

from __future__ import annotations


class WaddleError(Exception):
    """Raised by waddle-ai's own code; third-party exceptions are wrapped or passed as they are."""


__all__ = ["WaddleError"]
