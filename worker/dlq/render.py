"""Dead letters on a terminal: the table of `dlq list`, one letter for `dlq show`, a progress bar.

Everything a viewer wrote goes through `printable` first: chat text must not
move an operator's cursor or reverse what they read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

import orjson

from worker.dlq.letters import NOT_JSON, DeadLetter, iso, json_value, jsonable, printable


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def _cut(text: str, width: int) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(letters: Sequence[DeadLetter], now: datetime) -> str:
    columns = ("ID", "AGE", "ERROR TYPE", "RETRIES", "COMMUNITY", "REASON", "MESSAGE")
    rows = [
        (
            printable(letter.id), format_age(letter.age_s(now)), _cut(letter.error_type, 24),
            str(letter.retry_count), _cut(letter.community or "-", 24),
            _cut(letter.error or "-", 48), letter.preview,
        )
        for letter in letters
    ]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    lines = [columns, *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def render_letter(letter: DeadLetter, now: datetime) -> str:
    lines = [
        f"id:          {printable(letter.id)}",
        f"source:      {letter.source}",
        f"error type:  {printable(letter.error_type)}",
        f"error:       {printable(letter.error)}",
        f"retries:     {letter.retry_count}",
        f"failed at:   {iso(letter.failed_at) or '-'} ({format_age(letter.age_s(now))} ago)",
        "properties:",
        *(f"  {name}: {printable(str(jsonable(value)))}"
          for name, value in letter.properties.items()),
        "headers:",
    ]
    for name, value in letter.headers.items():
        shown = jsonable(value)
        text = shown if isinstance(shown, str) and shown else orjson.dumps(shown).decode()
        lines.append(f"  {printable(name)}: {printable(text)}")
    event = json_value(letter.body)
    if event is not NOT_JSON:
        body = orjson.dumps(event, option=orjson.OPT_INDENT_2).decode()
        lines.append(f"body (JSON, {len(letter.body)} bytes):")
    else:
        try:
            body = letter.body.decode("utf-8")
            lines.append(f"body (not JSON, {len(letter.body)} bytes):")
        except UnicodeDecodeError:
            body = repr(letter.body)
            lines.append(f"body (not UTF-8, {len(letter.body)} bytes, as a Python bytes literal):")
    lines.extend("  " + printable(line) for line in body.splitlines() or [""])
    return "\n".join(lines)


class ProgressBar:
    """A bar on a terminal, a count line now and then otherwise; nothing for a few letters."""

    WIDTH = 30
    MIN_TOTAL = 20
    LINE_EVERY = 100

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._tty = stream.isatty()
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        if total < self.MIN_TOTAL:
            return
        if self._tty:
            filled = self.WIDTH * done // max(total, 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self._stream.write(f"\r{self._label} [{bar}] {done}/{total}")
            self._stream.flush()
            self._drawn = True
        elif done % self.LINE_EVERY == 0 or done == total:
            self._stream.write(f"{self._label}: {done}/{total} dead letters examined\n")
            self._stream.flush()

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
