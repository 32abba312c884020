"""Every reply a test's router sees, counted per event in the background.

Shared by the fault and outage tests (the `replies` fixture in conftest.py):
"answered once" is judged on what reaches `ai.responses`, as a router sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from worker.client import RouterClient


class ReplyCounter:
    """Counts every reply per correlation id, in the background, for the whole test.

    Arrival times (and named moments such as the kill) are kept too: when an
    event is answered twice, they show on which side of the kill each reply came.
    """

    def __init__(self, client: RouterClient) -> None:
        self.counts: Counter[str] = Counter()
        # What a router that drops repeats by message_id would keep: one entry
        # per distinct (message_id, body) of each event.
        self.distinct: dict[str, set[tuple[str, bytes]]] = {}
        self.arrivals: dict[str, list[float]] = {}
        self.marks: dict[str, float] = {}
        self._task = asyncio.create_task(self._collect(client))

    async def _collect(self, client: RouterClient) -> None:
        while True:
            try:
                message = await client.next_reply(3600)
            except TimeoutError:
                continue
            event_id = message.correlation_id or "<none>"
            self.counts[event_id] += 1
            self.distinct.setdefault(event_id, set()).add((message.message_id or "", message.body))
            self.arrivals.setdefault(event_id, []).append(time.monotonic())

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def timeline(self, event_id: str) -> str:
        """`reply at SIGKILL-0.012s, reply at SIGKILL+16.9s`: each reply against each mark."""
        parts = []
        for arrived in self.arrivals.get(event_id, []):
            against = ", ".join(f"{name}{arrived - at:+.3f}s" for name, at in self.marks.items())
            parts.append(f"reply at {against or f'{arrived:.3f}'}")
        return "; ".join(parts) or "no reply"

    async def wait_count(self, event_id: str, count: int, timeout_s: float) -> None:
        """Until `event_id` has had `count` replies; fail with its timeline otherwise."""
        started = time.monotonic()
        while self.counts[event_id] < count:
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{event_id}: {self.timeline(event_id)}; expected {count}")
            await asyncio.sleep(0.01)

    def answered(self, event_ids: Iterable[str]) -> int:
        return sum(1 for event_id in event_ids if self.counts[event_id] > 0)

    async def wait_answered(
        self, event_ids: Sequence[str], count: int, timeout_s: float, what: str
    ) -> float:
        """Wait until `count` of `event_ids` have a reply; return the seconds it took."""
        started = time.monotonic()
        while (answered := self.answered(event_ids)) < count:
            if time.monotonic() - started > timeout_s:
                raise AssertionError(
                    f"{what}: {answered}/{count} events answered after {timeout_s:g} s")
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
