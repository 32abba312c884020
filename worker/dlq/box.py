"""The DLQ on the broker: look at letters, replay them, purge them, never losing one.

Reading. AMQP has no "peek": the only way to see a message is to take it. We
take letters with basic.get *without* acking, on a channel of our own, and
give back (nack, requeue) every one we did not mean to remove. While we hold
a letter nobody else can take it, and if we die the broker returns it when
our channel goes; so looking never loses a letter. We read until the queue
runs dry, which it does: what we hold is invisible to our own gets too. The
price is that two readers at once hide letters from each other: a `replay
--all` run while a `list` holds everything finds fewer letters, and says how
many are left afterwards.

Replaying. A selected letter stays unacked, hence invisible to every other
reader, until the broker has confirmed its copy in the interaction queue; we
ack it right after. So two replays at once can never both republish one
letter: whoever holds it is the only one who can. The one remaining window,
a connection lost after the confirm but before the ack reaches the broker,
returns the letter and a later replay sends it again; that is ordinary
at-least-once delivery, and the worker answers an event_id only once. An
event that fails again at once (an invalid one) may be back in the DLQ
before the run ends; the run then holds it rather than replaying it again.

What the broker does not let us keep:
- Order. A quorum queue may requeue returned letters in another order
  (RabbitMQ 3.10 does once more than ~32 come back at once). A DLQ's order
  means nothing (each letter is its own event), so `list` sorts by failure
  time, which is stable.
- `x-delivery-count` rises by one each time a letter is looked at. Harmless
  on RabbitMQ 3.x, where the DLQ has no delivery limit. RabbitMQ 4.0-4.2 give
  every quorum queue a default limit of 20 returns, and a DLQ without a
  dead-letter exchange of its own would then drop a letter looked at 20
  times: there the DLQ needs `x-delivery-limit: -1` (unlimited on 4.x; but
  3.10 drops a message at its first return under -1, so the argument has to
  depend on the broker's version). From 4.3 a nack no longer counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPError
from aiormq.exceptions import ChannelNotFoundEntity

from broker.topology import Topology
from publishers.confirm import PublishFailed, publish_confirmed
from publishers.failures import copy_message
from schemas.errors import WaddleError
from worker.dlq.letters import DeadLetter, ReplayResult, Selection, replay_headers, sort_letters


class DeadLetterQueueMissing(WaddleError, RuntimeError):
    """The DLQ of this prefix does not exist: nothing was declared, or the prefix is wrong."""


Progress = Callable[[int, int], None]


# -- the box ----------------------------------------------------------------------


class _Hold:
    """Letters taken from the DLQ on one channel, not yet settled.

    Whatever is still held when the hold ends goes back to the DLQ; if we
    cannot say so (the channel died), the broker returns it anyway when the
    channel closes.
    """

    RETURN_WAIT_S = 2.0

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, ready: int) -> None:
        self.channel = channel
        # Ready letters when we started: only a hint (for progress), as
        # letters held by another reader are not counted and may come back.
        self.ready_at_start = ready
        self._queue = queue
        self._held: dict[int, AbstractIncomingMessage] = {}

    async def next(self) -> AbstractIncomingMessage | None:
        """The next ready letter, or None once there is none.

        No count bounds this: what we hold is invisible to our own gets, so
        the queue runs dry after at most every letter plus those that
        arrive meanwhile.
        """
        if self.channel.is_closed:
            return None
        message = await self._queue.get(no_ack=False, fail=False)
        if message is None:
            return None
        assert message.delivery_tag is not None
        self._held[message.delivery_tag] = message
        return message

    async def remove(self, message: AbstractIncomingMessage) -> None:
        """Ack: the letter leaves the DLQ for good."""
        assert message.delivery_tag is not None
        await message.ack()
        del self._held[message.delivery_tag]

    async def give_back(self) -> None:
        returned = 0
        # nack, not reject: from RabbitMQ 4.3 a nack is a plain return that
        # does not count toward a delivery limit, a reject is a failure that does.
        for tag in sorted(self._held):
            if self.channel.is_closed:
                break
            await self._held[tag].nack(requeue=True)
            returned += 1
        self._held.clear()
        if returned:
            with contextlib.suppress(AMQPError, ConnectionError):  # only a courtesy wait
                await self._until_ready(returned)

    async def _until_ready(self, returned: int) -> None:
        """Wait, briefly, until the broker shows what we gave back as ready again.

        A nack is asynchronous: the queue requeues a moment later. Whoever
        reads the DLQ right after us (a replay straight after a list, in one
        program) would otherwise miss the letters still on their way back.
        Another reader taking some meanwhile only makes this wait time out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.RETURN_WAIT_S
        while loop.time() < deadline and not self.channel.is_closed:
            queue = await self.channel.declare_queue(self._queue.name, passive=True)
            if (queue.declaration_result.message_count or 0) >= returned:
                return
            await asyncio.sleep(0.01)


class DeadLetterBox:
    """The DLQ of one deployment, over a connection the caller owns."""

    def __init__(self, connection: AbstractConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology

    @property
    def queue_name(self) -> str:
        return self._topology.dead_letter_queue

    async def count(self) -> int:
        """Letters ready in the DLQ (those held by a reader right now are not counted)."""
        channel = await self._connection.channel()
        try:
            queue = await self._declared(channel)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await _close(channel)

    async def letters(self) -> list[DeadLetter]:
        """Every letter, oldest failure first; the DLQ is left as it was."""
        letters: list[DeadLetter] = []
        async with self._hold() as hold:
            while (message := await hold.next()) is not None:
                letters.append(DeadLetter.from_message(message))
        return sort_letters(letters)

    async def find(self, wanted_id: str) -> list[DeadLetter]:
        """The letters with this id (usually one; more if an event died twice)."""
        return [letter for letter in await self.letters() if letter.id == wanted_id]

    async def replay(
        self, selection: Selection, *, dry_run: bool = False, progress: Progress | None = None,
    ) -> ReplayResult:
        """Republish the selected letters to the interaction queue, removing each once confirmed.

        Letters that are not selected, and letters whose republish failed,
        stay in the DLQ untouched (apart from the broker's delivery count).
        """
        result = ReplayResult(dry_run=dry_run)
        # A replayed event can fail again at once (an invalid one does) and be
        # back in the DLQ before we are done; we then hold it, not replay it again.
        sent: set[tuple[str, bytes]] = set()
        async with self._hold(publisher_confirms=True) as hold:
            while not selection.full(len(result.replayed)):
                message = await hold.next()
                if message is None:
                    break
                result.examined += 1
                letter = DeadLetter.from_message(message)
                key = (letter.id, hashlib.sha256(message.body).digest())
                if selection.matches(letter) and key not in sent:
                    error = None if dry_run else await self._republish(hold, message)
                    if error is None:
                        result.replayed.append(letter)
                        sent.add(key)
                    else:
                        result.failed.append((letter, error))
                if progress is not None:
                    progress(result.examined, max(hold.ready_at_start, result.examined))
        result.left = await self.count()
        return result

    async def purge(self) -> int:
        """Remove every ready letter; returns how many went.

        Letters another reader holds at that moment are not ready, so they
        survive and come back when it lets go: a purge never races a replay
        into losing an event that is being republished.
        """
        channel = await self._connection.channel()
        try:
            queue = await self._declared(channel)
            purged = await queue.purge()
            return int(getattr(purged, "message_count", 0) or 0)
        finally:
            await _close(channel)

    async def _republish(self, hold: _Hold, message: AbstractIncomingMessage) -> str | None:
        """None once the copy is confirmed and the letter removed, else why not."""
        copy = copy_message(message, replay_headers(message.headers))
        try:
            await publish_confirmed(
                hold.channel.default_exchange, copy, self._topology.interaction_queue)
        except PublishFailed as exc:
            return f"not republished ({exc}); it stays in the DLQ"
        try:
            await hold.remove(message)
        except (AMQPError, ConnectionError) as exc:
            return (f"republished, but not removed from the DLQ ({exc!r}): a later replay "
                    "sends it again, and the worker answers its event_id only once")
        return None

    @asynccontextmanager
    async def _hold(self, *, publisher_confirms: bool = False) -> AsyncIterator[_Hold]:
        channel = await self._connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=publisher_confirms)
        try:
            queue = await self._declared(channel)
            hold = _Hold(channel, queue, int(queue.declaration_result.message_count or 0))
            try:
                yield hold
            finally:
                await hold.give_back()
        finally:
            await _close(channel)

    async def _declared(self, channel: AbstractChannel) -> AbstractQueue:
        try:
            return await channel.declare_queue(self.queue_name, passive=True)
        except ChannelNotFoundEntity as exc:
            raise DeadLetterQueueMissing(
                f"there is no queue {self.queue_name!r} on the broker: nothing was declared "
                f"with QUEUE_PREFIX={self._topology.prefix!r} yet (run `waddle-ai topology` "
                "or start a worker), or the prefix is not the workers' one"
            ) from exc


async def _close(channel: AbstractChannel) -> None:
    # A channel the broker already dropped has returned what it held.
    if not channel.is_closed:
        with contextlib.suppress(AMQPError, ConnectionError):
            await channel.close()
