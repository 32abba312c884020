"""Keep an attempt's in-flight lease alive for as long as the attempt runs.

The lease (`AdmitRequest.lease_ms`, the provider timeout + 15 s) tells a
copy of the event delivered elsewhere "someone is answering this; wait". It
expires on its own so that a worker killed mid-event does not block its
events forever. But a generation slower than the lease (a local model under
CPU contention, a long answer streamed slowly) then looked like a dead
worker's: a copy was admitted and generated again from scratch, and the
first, slow answer was thrown away (its stash found the lease lost). Twice
the load, exactly when the machine was overloaded.

So while the attempt runs, `LeaseKeeper` renews the lease every third of its
length. A live attempt keeps it however long it generates (its provider
timeout still bounds that); a dead one stops renewing, and its lease expires
as before. One renewal is a single Lua call (Redis) or a dict write (memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import TYPE_CHECKING

from context.store import StateStore

if TYPE_CHECKING:
    from observability.metrics import Metrics

log = logging.getLogger(__name__)

RENEW_FRACTION = 3


class LeaseKeeper:
    """`async with LeaseKeeper(store, event_id, attempt_id, lease_ms):` renews while inside."""

    def __init__(
        self,
        store: StateStore,
        event_id: str,
        attempt_id: str,
        lease_ms: int,
        *,
        metrics: Metrics | None = None,
        every_s: float | None = None,
    ) -> None:
        if lease_ms <= 0:
            raise ValueError("lease_ms must be positive")
        self._store = store
        self._event_id = event_id
        self._attempt_id = attempt_id
        self._lease_ms = lease_ms
        self._metrics = metrics
        self._every_s = every_s if every_s is not None else lease_ms / 1000 / RENEW_FRACTION
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0
        # Another attempt holds the lease now: this one's reply will not be stashed.
        self.lost = False

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.get_running_loop().create_task(
            self._renew_until_cancelled(), name=f"lease-{self._event_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _renew_until_cancelled(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            try:
                held = await self._store.renew_lease(
                    self._event_id, self._attempt_id, self._lease_ms)
            except Exception as exc:
                # Redis busy or gone: the lease runs on; the next renewal may land.
                if self._metrics is not None:
                    self._metrics.state_errors.labels("renew_lease").inc()
                log.warning("could not renew the in-flight lease", extra={
                    "action": "renew_lease", "event_id": self._event_id, "error": repr(exc)})
                continue
            if not held:
                self.lost = True
                log.warning("in-flight lease lost while generating; another attempt holds it",
                            extra={"action": "renew_lease", "event_id": self._event_id})
                return
            self.renewals += 1
