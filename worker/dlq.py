"""Dead letters: look at them, replay them, purge them, without losing or duplicating one.

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

import argparse
import asyncio
import contextlib
import hashlib
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TextIO

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPError
from aiormq.exceptions import ChannelNotFoundEntity

from broker.topology import Topology
from config.settings import Settings
from publishers.confirm import PublishFailed, publish_confirmed
from publishers.failures import copy_message, now_rfc3339, retry_count
from schemas import headers
from worker.errors import describe_failure
from worker.provider_check import unreachable_providers

PREVIEW_CHARS = 60

# Headers the broker sets on dead-lettering or delivery. A replay clears them
# with the retry headers, so the event comes back as the router first sent it.
_BROKER_HEADERS = ("x-delivery-count", "x-acquired-count")
_BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-")

_BROKER_REASONS = {
    "delivery_limit": "redelivered past the delivery limit of {queue}: workers took it and "
                      "never settled it (crashed, killed or cut off mid-event)",
    "rejected": "rejected without requeue by a consumer of {queue}",
    "expired": "expired in {queue} (message TTL)",
    "maxlen": "dropped by the length limit of {queue}",
}

Source = Literal["worker", "broker"]


class DeadLetterQueueMissing(RuntimeError):
    """The DLQ of this prefix does not exist: nothing was declared, or the prefix is wrong."""


# -- one letter ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as an operator needs to see it, detached from its delivery."""

    id: str
    body: bytes
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    source: Source
    error_type: str
    error: str
    retry_count: int
    failed_at: datetime | None
    community: str | None
    preview: str

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> DeadLetter:
        message_headers: Mapping[str, Any] = dict(message.headers or {})
        event = _json_object(message.body)
        source, error_type, error, failed_at = _failure(message_headers)
        community = event.get("community_id") if event else None
        content = event.get("message_content") if event else None
        return cls(
            id=letter_id(message.message_id, message.body),
            body=message.body,
            headers=message_headers,
            properties=_properties(message),
            source=source,
            error_type=error_type,
            error=error,
            retry_count=retry_count(message_headers),
            failed_at=failed_at or message.timestamp,
            community=community if isinstance(community, str) else None,
            preview=preview(content) if isinstance(content, str) else "",
        )

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.failed_at is None:
            return None
        failed_at = self.failed_at
        if failed_at.tzinfo is None:
            failed_at = failed_at.replace(tzinfo=UTC)
        return max(0.0, ((now or datetime.now(UTC)) - failed_at).total_seconds())

    def summary(self, now: datetime | None = None) -> dict[str, Any]:
        """The row of `dlq list --json`."""
        age = self.age_s(now)
        return {
            "id": self.id,
            "age_s": None if age is None else round(age, 3),
            "failed_at": _iso(self.failed_at),
            "source": self.source,
            "error_type": self.error_type,
            "error": self.error,
            "retry_count": self.retry_count,
            "community": self.community,
            "preview": self.preview,
        }

    def detail(self, now: datetime | None = None) -> dict[str, Any]:
        """Everything about the letter, for `dlq show --json`."""
        body: Any
        event = _json_value(self.body)
        if event is not _NOT_JSON:
            body, encoding = event, "json"
        else:
            try:
                body, encoding = self.body.decode("utf-8"), "text"
            except UnicodeDecodeError:
                body, encoding = repr(self.body), "bytes-repr"
        return {
            **self.summary(now),
            "properties": _jsonable(self.properties),
            "headers": _jsonable(self.headers),
            "body": body,
            "body_encoding": encoding,
        }


def letter_id(message_id: str | None, body: bytes) -> str:
    """The router's message_id (the event_id), else a hash of the body, stable across reads."""
    if message_id:
        return message_id
    return hashlib.sha256(body).hexdigest()[:12]


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """One line of at most `limit` characters, safe to print on a terminal."""
    line = _printable(" ".join(text.split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def replay_headers(original: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers of a replayed event: the failure and broker bookkeeping gone, the rest kept.

    `x-replayed-at` marks it replayed: an operator chose to have it answered,
    so its age counts from now, not from when the viewer wrote it.
    """
    kept = {
        key: value for key, value in (original or {}).items()
        if key not in headers.RETRY_HEADERS and key not in _BROKER_HEADERS
        and not key.startswith(_BROKER_HEADER_PREFIXES)
    }
    kept[headers.REPLAYED_AT] = now_rfc3339()
    return kept


def _failure(h: Mapping[str, Any]) -> tuple[Source, str, str, datetime | None]:
    """Who dead-lettered the letter, why, and when.

    Worker letters never carry `x-death` (the worker strips it), so `x-death`
    means the broker moved this letter itself; any `x-error` it still carries
    is from an earlier, retried attempt, and is shown as such.
    """
    deaths = h.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        death = deaths[0]
        reason = str(death.get("reason") or h.get("x-first-death-reason") or "unknown")
        queue = str(death.get("queue") or h.get("x-first-death-queue") or "its queue")
        text = _BROKER_REASONS.get(reason, reason + ": dead-lettered by the broker from {queue}")
        error = text.replace("{queue}", queue)  # not format(): headers are anyone's text
        count = death.get("count")
        if isinstance(count, int) and count > 1:
            error += f" ({count} times)"
        earlier = h.get(headers.ERROR)
        if earlier:
            error += f"; before that: {earlier}"
        when = death.get("time")
        return "broker", reason, error, when if isinstance(when, datetime) else None
    return (
        "worker",
        str(h.get(headers.ERROR_TYPE) or "unknown"),
        str(h.get(headers.ERROR) or ""),
        _parse_time(h.get(headers.LAST_FAILED_AT) or h.get(headers.FIRST_FAILED_AT)),
    )


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_NOT_JSON = object()


def _json_value(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _json_object(body: bytes) -> dict[str, Any] | None:
    value = _json_value(body)
    return value if isinstance(value, dict) else None


def _properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    names = ("message_id", "correlation_id", "content_type", "content_encoding",
             "delivery_mode", "priority", "reply_to", "timestamp", "type", "app_id", "user_id")
    values = {name: getattr(message, name, None) for name in names}
    return {name: value for name, value in values.items() if value not in (None, "")}


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    """AMQP field values (datetimes, bytes, decimals, nested tables) as JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


# Control characters and bidi overrides: a viewer's chat text must not be able
# to move an operator's cursor, recolour the terminal or reverse what they read.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    return _UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


# -- selecting and reporting ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """Which letters a replay takes.

    Each filter given must match (a letter matches a filter when it matches
    any of its values); no filter at all selects every letter.
    """

    ids: frozenset[str] = frozenset()
    error_types: frozenset[str] = frozenset()
    communities: frozenset[str] = frozenset()
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (not self.ids or letter.id in self.ids)
            and (not self.error_types or letter.error_type in self.error_types)
            and (not self.communities or letter.community in self.communities)
        )

    def full(self, taken: int) -> bool:
        return self.limit is not None and taken >= self.limit


@dataclass(slots=True)
class ReplayResult:
    dry_run: bool = False
    replayed: list[DeadLetter] = field(default_factory=list)  # or would be, on a dry run
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    examined: int = 0
    # Letters ready in the DLQ once the replay was done.
    left: int = 0


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


def sort_letters(letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    """Oldest failure first; letters without a time last, in the order read."""
    far_future = datetime.max.replace(tzinfo=UTC)

    def when(letter: DeadLetter) -> datetime:
        if letter.failed_at is None:
            return far_future
        return letter.failed_at if letter.failed_at.tzinfo else letter.failed_at.replace(
            tzinfo=UTC)

    return sorted(letters, key=when)


async def _close(channel: AbstractChannel) -> None:
    # A channel the broker already dropped has returned what it held.
    if not channel.is_closed:
        with contextlib.suppress(AMQPError, ConnectionError):
            await channel.close()


# -- the command line ---------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`waddle-ai dlq ...`."""
    dlq = commands.add_parser(
        "dlq", help="inspect, replay and purge dead letters",
        description="Inspect, replay and purge the dead letters of QUEUE_PREFIX's DLQ. "
                    "Safe while workers run: it touches only the DLQ, and publishes "
                    "replays to the interaction queue.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list", help="every dead letter, oldest first (the DLQ is left as it was)")
    listing.add_argument("--json", action="store_true", help="one JSON array, for machines")

    show = actions.add_parser("show", help="the full headers and body of one letter")
    show.add_argument("id", help="the letter's id, as `dlq list` prints it")
    show.add_argument("--json", action="store_true", help="as JSON")

    replay = actions.add_parser(
        "replay",
        help="republish letters to the interaction queue, removing each once confirmed",
        description="Republish the selected letters, body unchanged and retry headers "
                    "cleared, to the interaction queue; each leaves the DLQ only after the "
                    "broker confirmed its copy. Filters combine (all must match); a "
                    "repeated filter matches any of its values.",
    )
    replay.add_argument("--all", action="store_true", help="every letter (no filter)")
    replay.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                        help="a letter's id (repeatable)")
    replay.add_argument("--error-type", dest="error_types", action="append", default=[],
                        metavar="T", help="e.g. provider_unavailable, delivery_limit (repeatable)")
    replay.add_argument("--community", dest="communities", action="append", default=[],
                        metavar="C", help="community_id of the event (repeatable)")
    replay.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help="replay at most N letters")
    replay.add_argument("--dry-run", action="store_true",
                        help="print what would be replayed and change nothing")

    purge = actions.add_parser("purge", help="remove every dead letter for good")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {value!r}")
    return number


async def command(settings: Settings, args: argparse.Namespace, topology: Topology) -> int:
    """One `dlq` action. Usage is checked before the broker is touched, so a
    refusal (exit 2) has changed nothing; 1 is the broker's refusal or a failed republish.
    """
    action: str = args.dlq_command
    if action == "replay" and args.all and (args.ids or args.error_types or args.communities):
        return _usage("dlq replay: --all replays every letter; drop it, or the filters")
    if action == "replay" and not (args.all or args.ids or args.error_types or args.communities):
        return _usage("dlq replay: say which letters: --all, --id, --error-type or --community")
    if action == "purge" and not args.yes and not sys.stdin.isatty():
        return _usage("dlq purge removes every dead letter for good; stdin is not a terminal "
                      "to ask on, so confirm with --yes")
    # Not connect_robust: held letters and their delivery tags die with the
    # connection, and a silent reconnect would go on acking tags that no longer exist.
    try:
        connection = await aio_pika.connect(
            settings.amqp_url, client_properties={"connection_name": "waddle-ai dlq"})
    except (AMQPError, OSError) as exc:
        print(f"waddle-ai: {describe_failure(exc, settings).message}", file=sys.stderr)
        return 1
    box = DeadLetterBox(connection, topology)
    try:
        if action == "list":
            return await _list(box, as_json=args.json)
        if action == "show":
            return await _show(box, args.id, as_json=args.json)
        if action == "replay":
            selection = Selection(
                ids=frozenset(args.ids), error_types=frozenset(args.error_types),
                communities=frozenset(args.communities), limit=args.limit,
            )
            # Said before replaying, and never a reason not to: the events wait
            # for the provider in the workers (an open circuit spends no retry).
            for unreachable in await unreachable_providers(settings):
                print(f"waddle-ai: {unreachable.sentence()}", file=sys.stderr)
            return await _replay(box, topology, selection, dry_run=args.dry_run)
        return await _purge(box, ask=not args.yes)
    except DeadLetterQueueMissing as exc:
        print(f"waddle-ai: {exc}", file=sys.stderr)
        return 1
    finally:
        await connection.close()


def _usage(message: str) -> int:
    print(f"waddle-ai: {message}", file=sys.stderr)
    return 2


async def _list(box: DeadLetterBox, *, as_json: bool) -> int:
    letters = await box.letters()
    now = datetime.now(UTC)
    if as_json:
        print(orjson.dumps([letter.summary(now) for letter in letters],
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    if not letters:
        print(f"no dead letters in {box.queue_name}")
        return 0
    print(render_table(letters, now))
    noun = "letter" if len(letters) == 1 else "letters"
    print(f"\n{len(letters)} dead {noun} in {box.queue_name}")
    return 0


async def _show(box: DeadLetterBox, wanted_id: str, *, as_json: bool) -> int:
    letters = await box.find(wanted_id)
    if not letters:
        print(f"waddle-ai: no dead letter with id {wanted_id!r} in {box.queue_name} "
              "(see `waddle-ai dlq list`)", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    if as_json:
        print(orjson.dumps([letter.detail(now) for letter in letters],
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    print("\n\n".join(render_letter(letter, now) for letter in letters))
    return 0


async def _replay(
    box: DeadLetterBox, topology: Topology, selection: Selection, *, dry_run: bool,
) -> int:
    bar = ProgressBar(sys.stderr, "dry run" if dry_run else "replaying")
    try:
        result = await box.replay(selection, dry_run=dry_run, progress=bar.update)
    finally:
        bar.close()
    for letter, error in result.failed:
        print(f"waddle-ai: {letter.id}: {error}", file=sys.stderr)
    if dry_run:
        if result.replayed:
            print(render_table(result.replayed, datetime.now(UTC)))
        print(f"would replay {len(result.replayed)} of {result.examined} dead letters to "
              f"{topology.interaction_queue}; nothing was changed")
        return 0
    print(f"replayed {len(result.replayed)} to {topology.interaction_queue}, "
          f"failed {len(result.failed)}, left {result.left} in {box.queue_name}")
    return 1 if result.failed else 0


async def _purge(box: DeadLetterBox, *, ask: bool) -> int:
    if ask:
        count = await box.count()
        if count == 0:
            print(f"no dead letters in {box.queue_name}")
            return 0
        prompt = (f"This removes {count} dead letters from {box.queue_name} for good. "
                  "Type yes to go on: ")
        print(prompt, end="", file=sys.stderr, flush=True)
        try:
            answer = await asyncio.to_thread(sys.stdin.readline)
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip().lower() != "yes":
            print("not purged", file=sys.stderr)
            return 1
    removed = await box.purge()
    print(f"purged {removed} dead letters from {box.queue_name}")
    return 0


# -- rendering ------------------------------------------------------------------------


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
    text = _printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(letters: Sequence[DeadLetter], now: datetime) -> str:
    columns = ("ID", "AGE", "ERROR TYPE", "RETRIES", "COMMUNITY", "REASON", "MESSAGE")
    rows = [
        (
            _printable(letter.id), format_age(letter.age_s(now)), _cut(letter.error_type, 24),
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
        f"id:          {_printable(letter.id)}",
        f"source:      {letter.source}",
        f"error type:  {_printable(letter.error_type)}",
        f"error:       {_printable(letter.error)}",
        f"retries:     {letter.retry_count}",
        f"failed at:   {_iso(letter.failed_at) or '-'} ({format_age(letter.age_s(now))} ago)",
        "properties:",
        *(f"  {name}: {_printable(str(_jsonable(value)))}"
          for name, value in letter.properties.items()),
        "headers:",
    ]
    for name, value in letter.headers.items():
        shown = _jsonable(value)
        text = shown if isinstance(shown, str) and shown else orjson.dumps(shown).decode()
        lines.append(f"  {_printable(name)}: {_printable(text)}")
    event = _json_value(letter.body)
    if event is not _NOT_JSON:
        body = orjson.dumps(event, option=orjson.OPT_INDENT_2).decode()
        lines.append(f"body (JSON, {len(letter.body)} bytes):")
    else:
        try:
            body = letter.body.decode("utf-8")
            lines.append(f"body (not JSON, {len(letter.body)} bytes):")
        except UnicodeDecodeError:
            body = repr(letter.body)
            lines.append(f"body (not UTF-8, {len(letter.body)} bytes, as a Python bytes literal):")
    lines.extend("  " + _printable(line) for line in body.splitlines() or [""])
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
