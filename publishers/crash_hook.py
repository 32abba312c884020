"""Test-only fault injection: die right after the broker confirmed a reply.

`WADDLE_TEST_CRASH_AFTER_CONFIRM` (never set in production) makes the worker
publish its reply, wait for the broker's confirm, and then exit on the spot
(`os._exit`, as a segfault or an OOM kill would) before the event is marked
answered and before it is acked: the one window the README's "Failure
handling" describes. The fault tests use it to prove that the next delivery
republishes the stashed reply byte for byte without a second provider call.

It is a `ReplyPublisher` chosen once, at composition (worker/app.py), so the
normal path carries no check at all.
"""

from __future__ import annotations

import logging
import os

from aio_pika.abc import AbstractChannel

from observability.metrics import Metrics
from publishers.replies import ReplyPublisher
from schemas.replies import Reply

log = logging.getLogger(__name__)

CRASH_EXIT_CODE = 70


class CrashAfterConfirm(ReplyPublisher):
    """Publishes as usual; exits once the reply to an event whose id has `marker` is confirmed."""

    marker: str = ""

    @classmethod
    async def open_crashing(
        cls, channel: AbstractChannel, exchange_name: str, marker: str,
        metrics: Metrics | None = None,
    ) -> CrashAfterConfirm:
        publisher = await cls.open(channel, exchange_name, metrics)
        assert isinstance(publisher, CrashAfterConfirm)
        publisher.marker = marker
        return publisher

    async def publish(self, reply: Reply, *, traceparent: str | None = None) -> None:
        await super().publish(reply, traceparent=traceparent)
        if self.marker and self.marker in reply.event_id:
            log.critical("reply confirmed; crash hook exits before it is recorded",
                         extra={"action": "crash_hook", "event_id": reply.event_id})
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
