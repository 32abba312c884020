"""`waddle-ai dlq` on the real broker, with dead letters made the two ways production makes them.

Worker letters are published to the test's DLX with the headers the worker's
own `failure_headers` writes; broker letters are made by the broker itself,
by exceeding the interaction queue's delivery limit. Every test checks what
is left in the queues afterwards, since "nothing lost, nothing doubled" is
the point of the command.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from broker.topology import Topology
from config.settings import Settings
from publishers.failures import Failure, failure_headers
from schemas import headers
from tests.conftest import AMQP_URL, queue_depth, running_worker
from tests.fake_provider import FakeProvider
from tests.test_cli import clean_env
from worker.client import RouterClient, make_event
from worker.dlq.box import DeadLetterBox
from worker.dlq.letters import DeadLetter, Selection, letter_id, preview, replay_headers
from worker.dlq.render import ProgressBar, render_table

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BAD_BODY = b"{not json"


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture
def dlq_topology(prefix: str) -> Topology:
    """Delivery limit 1, so the broker dead-letters after a single redelivery."""
    return Topology(prefix=prefix, retry_delays_ms=(100, 200), delivery_limit=1)


@pytest.fixture
async def connection(
    dlq_topology: Topology, broker_cleanup: None
) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await dlq_topology.declare(channel)
    await channel.close()
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def box(connection: AbstractConnection, dlq_topology: Topology) -> DeadLetterBox:
    return DeadLetterBox(connection, dlq_topology)


async def dead_letter(
    connection: AbstractConnection,
    topology: Topology,
    body: Mapping[str, Any] | bytes,
    *,
    error_type: str = "provider_unavailable",
    error: str = "ollama: HTTP 503; gave up after 2 retries",
    retries: int = 2,
    extra_headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
) -> str:
    """A letter as the worker writes it; returns its id.

    aiormq gives every message it publishes a message_id, so a letter
    always has one; the worker's copy keeps the router's (the event_id).
    """
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    if message_id is None and not isinstance(body, bytes):
        message_id = str(body["event_id"])
    assert message_id is not None
    letter_headers = failure_headers(
        {headers.TRACEPARENT: TRACEPARENT, **(extra_headers or {})},
        Failure(error_type, error), original_queue=topology.interaction_queue,
        count_retry=False,
    )
    letter_headers[headers.RETRY_COUNT] = retries
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        dlx = await channel.get_exchange(topology.dead_letter_exchange, ensure=False)
        await dlx.publish(
            aio_pika.Message(
                raw, headers=letter_headers, content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id,
            ),
            routing_key=topology.interaction_queue, mandatory=True,
        )
    finally:
        await channel.close()
    return message_id


async def wait_for_depth(queue_name: str, depth: int, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while await queue_depth(queue_name) != depth:  # noqa: ASYNC110 - polling the broker
            await asyncio.sleep(0.05)


async def broker_dead_letter(
    connection: AbstractConnection, topology: Topology, event: Mapping[str, Any],
    extra_headers: Mapping[str, Any] | None = None,
) -> str:
    """Let the broker dead-letter `event` by redelivering it past the delivery limit."""
    before = await queue_depth(topology.dead_letter_queue)
    channel = await connection.channel(publisher_confirms=True)
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps(event),
                headers={headers.TRACEPARENT: TRACEPARENT, **(extra_headers or {})},
                content_type="application/json", message_id=str(event["event_id"]),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=topology.interaction_queue,
        )
        queue = await channel.get_queue(topology.interaction_queue, ensure=False)
        async with asyncio.timeout(10):
            while await queue_depth(topology.dead_letter_queue) == before:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                else:
                    await message.nack(requeue=True)
    finally:
        await channel.close()
    return str(event["event_id"])


async def take_all(
    connection: AbstractConnection, queue_name: str
) -> list[AbstractIncomingMessage]:
    """Everything in a queue (acked): what the worker would receive."""
    channel = await connection.channel()
    taken: list[AbstractIncomingMessage] = []
    try:
        queue = await channel.get_queue(queue_name, ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
    finally:
        await channel.close()
    return taken


async def waddle(
    *args: str, env: Mapping[str, str], stdin: int = asyncio.subprocess.DEVNULL,
    timeout_s: float = 60.0,
) -> tuple[int, str, str]:
    """The CLI as a script runs it: no terminal unless the test passes one."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=dict(env), stdin=stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@dataclass(frozen=True)
class Letters:
    """The three kinds of letter: a worker failure, an unparseable body, a broker letter."""

    failed: dict[str, Any]
    bad_id: str
    broker: dict[str, Any]

    @property
    def ids(self) -> set[str]:
        return {self.failed["event_id"], self.bad_id, self.broker["event_id"]}


async def three_letters(connection: AbstractConnection, topology: Topology) -> Letters:
    failed = make_event("hello\n   world " + "x" * 100, community="c1")
    broker = make_event("are you there?", community="c2")
    await dead_letter(connection, topology, failed)
    bad_id = await dead_letter(connection, topology, BAD_BODY, error_type="invalid_json",
                               error="body is not JSON: unexpected character", retries=0,
                               message_id="bad-json-1")
    # Retried once by a worker, then crashed every worker that took it.
    earlier = failure_headers({}, Failure("provider_timeout", "ollama: timed out after 30 s"),
                              original_queue=topology.interaction_queue, count_retry=True)
    await broker_dead_letter(connection, topology, broker, extra_headers=earlier)
    await wait_for_depth(topology.dead_letter_queue, 3)
    return Letters(failed, bad_id, broker)


# -- list -------------------------------------------------------------------------------


async def test_list_shows_every_letter_and_leaves_the_dlq_as_it_was(
    box: DeadLetterBox, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    letters = await three_letters(connection, dlq_topology)

    listed = {letter.id: letter for letter in await box.letters()}

    assert set(listed) == letters.ids
    failed = listed[letters.failed["event_id"]]
    assert failed.source == "worker"
    assert failed.error_type == "provider_unavailable"
    assert failed.error == "ollama: HTTP 503; gave up after 2 retries"
    assert failed.retry_count == 2
    assert failed.community == "c1"
    assert failed.preview == ("hello world " + "x" * 100)[:59] + "…"
    assert failed.body == orjson.dumps(letters.failed)
    assert failed.headers[headers.TRACEPARENT] == TRACEPARENT
    age = failed.age_s()
    assert age is not None
    assert 0 <= age < 60

    bad = listed[letters.bad_id]
    assert (bad.error_type, bad.retry_count, bad.community, bad.preview) == (
        "invalid_json", 0, None, "")

    broker = listed[letters.broker["event_id"]]
    assert broker.source == "broker"
    assert broker.error_type == "delivery_limit"
    assert dlq_topology.interaction_queue in broker.error
    assert broker.error.startswith("redelivered past the delivery limit of")
    assert broker.error.endswith("; before that: ollama: timed out after 30 s")
    assert broker.retry_count == 1
    assert broker.community == "c2"
    assert broker.preview == "are you there?"
    assert broker.age_s() is not None

    # Nothing moved: the same letters, still all there, readable again.
    assert await queue_depth(dlq_topology.dead_letter_queue) == 3
    assert {letter.id for letter in await box.letters()} == letters.ids
    assert await queue_depth(dlq_topology.dead_letter_queue) == 3
    assert await queue_depth(dlq_topology.interaction_queue) == 0


async def test_cli_list_prints_a_table_and_json(
    prefix: str, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    env = clean_env(prefix)
    code, out, err = await waddle("dlq", "list", env=env)
    assert code == 0, err
    assert f"no dead letters in {dlq_topology.dead_letter_queue}" in out

    letters = await three_letters(connection, dlq_topology)
    code, out, err = await waddle("dlq", "list", env=env)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "AGE", "ERROR", "TYPE", "RETRIES", "COMMUNITY", "REASON",
                              "MESSAGE"]
    for wanted in letters.ids:
        assert wanted in out
    failed_row = next(row for row in rows if row.startswith(letters.failed["event_id"]))
    assert "provider_unavailable" in failed_row
    assert " c1 " in failed_row
    assert "hello world xxx" in failed_row
    assert "delivery_limit" in out
    assert "invalid_json" in out
    assert f"3 dead letters in {dlq_topology.dead_letter_queue}" in out

    code, out, err = await waddle("dlq", "list", "--json", env=env)
    assert code == 0, err
    rows_json = orjson.loads(out)
    assert {row["id"] for row in rows_json} == letters.ids
    by_id = {row["id"]: row for row in rows_json}
    assert by_id[letters.failed["event_id"]] | {"age_s": 0, "failed_at": ""} == {
        "id": letters.failed["event_id"], "age_s": 0, "failed_at": "", "source": "worker",
        "error_type": "provider_unavailable",
        "error": "ollama: HTTP 503; gave up after 2 retries", "retry_count": 2,
        "community": "c1", "preview": ("hello world " + "x" * 100)[:59] + "…",
    }
    assert by_id[letters.broker["event_id"]]["error_type"] == "delivery_limit"
    assert await queue_depth(dlq_topology.dead_letter_queue) == 3


async def test_cli_says_when_the_dlq_does_not_exist(prefix: str) -> None:
    code, _, err = await waddle("dlq", "list", env=clean_env(prefix))
    assert code == 1
    assert f"there is no queue '{prefix}.interaction.dlq'" in err


def test_a_letter_without_a_message_id_is_named_by_its_body() -> None:
    assert letter_id("event-1", BAD_BODY) == "event-1"
    assert letter_id(None, BAD_BODY) == hashlib.sha256(BAD_BODY).hexdigest()[:12]
    assert letter_id("", BAD_BODY) == letter_id(None, BAD_BODY)
    assert letter_id(None, b"other") != letter_id(None, BAD_BODY)


def test_chat_text_cannot_drive_the_operators_terminal() -> None:
    text = "hi \x1b[2J\x1b]0;pwned\x07 \u202eevil\r\nbye"
    shown = preview(text)
    assert "\x1b" not in shown
    assert "\u202e" not in shown
    assert "\n" not in shown
    assert shown.startswith("hi \\u001b[2J")


# -- show -------------------------------------------------------------------------------


async def test_show_prints_headers_and_body_of_one_letter(
    prefix: str, box: DeadLetterBox, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    letters = await three_letters(connection, dlq_topology)
    env = clean_env(prefix)

    [found] = await box.find(letters.failed["event_id"])
    assert found.headers[headers.ERROR_TYPE] == "provider_unavailable"

    code, out, err = await waddle("dlq", "show", letters.failed["event_id"], env=env)
    assert code == 0, err
    assert "x-error: ollama: HTTP 503; gave up after 2 retries" in out
    assert "x-error-type: provider_unavailable" in out
    assert f"traceparent: {TRACEPARENT}" in out
    assert f"message_id: {letters.failed['event_id']}" in out
    assert "body (JSON" in out
    assert '"community_id": "c1"' in out

    code, out, err = await waddle("dlq", "show", letters.bad_id, env=env)
    assert code == 0, err
    assert "body (not JSON, 9 bytes)" in out
    assert "{not json" in out

    code, out, err = await waddle("dlq", "show", letters.broker["event_id"], "--json", env=env)
    assert code == 0, err
    [detail] = orjson.loads(out)
    assert detail["body"] == letters.broker
    assert detail["body_encoding"] == "json"
    assert detail["headers"]["x-death"][0]["reason"] == "delivery_limit"
    assert detail["headers"]["x-first-death-reason"] == "delivery_limit"

    code, _, err = await waddle("dlq", "show", "no-such-letter", env=env)
    assert code == 1
    assert "no dead letter with id 'no-such-letter'" in err
    assert await queue_depth(dlq_topology.dead_letter_queue) == 3


# -- replay -------------------------------------------------------------------------------


async def test_replay_all_sends_the_original_events_back_with_the_retry_headers_cleared(
    box: DeadLetterBox, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    letters = await three_letters(connection, dlq_topology)
    kept = make_event("keep my headers", community="c3")
    await dead_letter(connection, dlq_topology, kept, extra_headers={"x-tenant": "blue"})
    bodies = {
        letters.failed["event_id"]: orjson.dumps(letters.failed),
        letters.bad_id: BAD_BODY,
        letters.broker["event_id"]: orjson.dumps(letters.broker),
        kept["event_id"]: orjson.dumps(kept),
    }

    result = await box.replay(Selection())

    assert {letter.id for letter in result.replayed} == set(bodies)
    assert (result.failed, result.left) == ([], 0)
    assert await queue_depth(dlq_topology.dead_letter_queue) == 0
    events = await take_all(connection, dlq_topology.interaction_queue)
    assert len(events) == 4
    for event in events:
        event_id = event.message_id or ""
        assert event.body == bodies.pop(event_id)
        assert event.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert event.content_type == "application/json"
        event_headers = dict(event.headers or {})
        assert event_headers.pop(headers.TRACEPARENT) == TRACEPARENT
        # The broker stamps every quorum-queue delivery with the count, 0 on the first.
        assert event_headers.pop("x-delivery-count", 0) == 0
        # Marked replayed, so the worker counts its age from now.
        assert event_headers.pop(headers.REPLAYED_AT)
        expected = {"x-tenant": "blue"} if event_id == kept["event_id"] else {}
        assert event_headers == expected
    assert bodies == {}


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(error_types=frozenset({"provider_unavailable"})), {"e1", "e2"}),
        (Selection(ids=frozenset({"e3", "broker"})), {"e3", "broker"}),
        (Selection(communities=frozenset({"c1"})), {"e1", "e3", "broker"}),
        (Selection(error_types=frozenset({"provider_unavailable", "delivery_limit"}),
                   communities=frozenset({"c2"})), {"e2"}),
        (Selection(error_types=frozenset({"delivery_limit"})), {"broker"}),
        (Selection(ids=frozenset({"nope"})), set()),
    ],
    ids=["error-type", "ids", "community", "combined", "broker-letters", "no-match"],
)
async def test_replay_takes_only_the_selected_letters(
    box: DeadLetterBox, connection: AbstractConnection, dlq_topology: Topology,
    selection: Selection, expected: set[str],
) -> None:
    everything = await six_letters(connection, dlq_topology)

    result = await box.replay(selection)

    assert {letter.id for letter in result.replayed} == expected
    assert result.failed == []
    assert result.left == 6 - len(expected)
    moved = await take_all(connection, dlq_topology.interaction_queue)
    assert sorted(m.message_id or "" for m in moved) == sorted(expected)
    assert {letter.id for letter in await box.letters()} == everything - expected


async def test_replay_limit_and_dry_run(
    box: DeadLetterBox, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    everything = await six_letters(connection, dlq_topology)

    dry = await box.replay(Selection(communities=frozenset({"c1"})), dry_run=True)
    assert {letter.id for letter in dry.replayed} == {"e1", "e3", "broker"}
    assert dry.left == 6
    assert await queue_depth(dlq_topology.interaction_queue) == 0
    assert {letter.id for letter in await box.letters()} == everything

    limited = await box.replay(Selection(limit=2))
    assert len(limited.replayed) == 2
    assert limited.left == 4
    moved = await take_all(connection, dlq_topology.interaction_queue)
    assert {m.message_id or "" for m in moved} == {letter.id for letter in limited.replayed}
    assert {letter.id for letter in await box.letters()} == everything - {
        letter.id for letter in limited.replayed}


async def six_letters(connection: AbstractConnection, topology: Topology) -> set[str]:
    """e1..e4 from the worker, one unparseable body, one from the broker."""
    specs = [("e1", "c1", "provider_unavailable"), ("e2", "c2", "provider_unavailable"),
             ("e3", "c1", "invalid_schema"), ("e4", "c2", "empty_output")]
    for event_id, community, error_type in specs:
        await dead_letter(connection, topology,
                          make_event("hi", community=community, event_id=event_id),
                          error_type=error_type)
    bad = await dead_letter(connection, topology, BAD_BODY, error_type="invalid_json",
                            message_id="bad")
    await broker_dead_letter(connection, topology,
                             make_event("hi", community="c1", event_id="broker"))
    await wait_for_depth(topology.dead_letter_queue, 6)
    return {"e1", "e2", "e3", "e4", bad, "broker"}


async def test_cli_replay_selects_reports_and_checks_its_arguments(
    prefix: str, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    await six_letters(connection, dlq_topology)
    env = clean_env(prefix)

    code, out, err = await waddle("dlq", "replay", "--dry-run", "--community", "c1", env=env)
    assert code == 0, err
    assert "would replay 3 of 6 dead letters" in out
    assert "nothing was changed" in out
    for wanted in ("e1", "e3", "broker"):
        assert any(line.startswith(wanted + " ") for line in out.splitlines())

    code, out, err = await waddle("dlq", "replay", "--error-type", "provider_unavailable",
                                  "--id", "e2", "--id", "e4", env=env)
    assert code == 0, err
    assert f"replayed 1 to {dlq_topology.interaction_queue}, failed 0, left 5" in out
    assert [m.message_id for m in await take_all(
        connection, dlq_topology.interaction_queue)] == ["e2"]

    for bad_args, complaint in [
        ((), "say which letters"),
        (("--all", "--id", "e1"), "--all replays every letter"),
        (("--all", "--limit", "0"), "--limit"),
    ]:
        code, _, err = await waddle("dlq", "replay", *bad_args, env=env)
        assert code == 2
        assert complaint in err
    assert await queue_depth(dlq_topology.dead_letter_queue) == 5

    code, out, err = await waddle("dlq", "replay", "--all", "--limit", "3", env=env)
    assert code == 0, err
    assert "replayed 3" in out
    assert "left 2" in out
    assert await queue_depth(dlq_topology.dead_letter_queue) == 2


async def test_a_failed_republish_leaves_the_letter_in_the_dlq_and_exits_1(
    prefix: str, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    letters = await three_letters(connection, dlq_topology)
    channel = await connection.channel()
    await channel.queue_delete(dlq_topology.interaction_queue)  # now nothing takes the replay
    await channel.close()

    code, out, err = await waddle("dlq", "replay", "--all", env=clean_env(prefix))

    assert code == 1
    assert "replayed 0" in out
    assert "failed 3" in out
    assert "unroutable" in err
    assert "it stays in the DLQ" in err
    box = DeadLetterBox(connection, dlq_topology)
    assert {letter.id for letter in await box.letters()} == letters.ids


async def test_concurrent_replays_never_duplicate_a_letter(
    connection: AbstractConnection, dlq_topology: Topology
) -> None:
    count = 100
    events = [make_event(f"hello {n}", event_id=f"event-{n:03d}") for n in range(count)]
    await asyncio.gather(*(dead_letter(connection, dlq_topology, e) for e in events))
    await wait_for_depth(dlq_topology.dead_letter_queue, count)

    # Connected first, so the three really run at the same time.
    connections = await asyncio.gather(*(aio_pika.connect(AMQP_URL) for _ in range(3)))

    async def replay_all(own: AbstractConnection) -> list[str]:
        result = await DeadLetterBox(own, dlq_topology).replay(Selection())
        assert result.failed == []
        return [letter.id for letter in result.replayed]

    try:
        parts = await asyncio.gather(*(replay_all(own) for own in connections))
    finally:
        await asyncio.gather(*(own.close() for own in connections))

    replayed = [name for part in parts for name in part]
    assert len(replayed) == count
    assert len(set(replayed)) == count  # no letter was replayed by two of them
    assert sum(1 for part in parts if part) >= 2  # they did compete for the letters
    moved = await take_all(connection, dlq_topology.interaction_queue)
    assert len(moved) == count
    assert {m.message_id for m in moved} == {e["event_id"] for e in events}
    assert await queue_depth(dlq_topology.dead_letter_queue) == 0


async def test_two_cli_replays_at_once_never_duplicate_a_letter(
    prefix: str, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    count = 50
    events = [make_event(f"hello {n}", event_id=f"event-{n:03d}") for n in range(count)]
    await asyncio.gather(*(dead_letter(connection, dlq_topology, e) for e in events))
    await wait_for_depth(dlq_topology.dead_letter_queue, count)

    runs = await asyncio.gather(*(waddle("dlq", "replay", "--all", env=clean_env(prefix))
                                  for _ in range(2)))

    for code, _, err in runs:
        assert code == 0, err
    moved = await take_all(connection, dlq_topology.interaction_queue)
    assert len(moved) == count
    assert {m.message_id for m in moved} == {e["event_id"] for e in events}
    assert await queue_depth(dlq_topology.dead_letter_queue) == 0


def test_progress_is_a_bar_on_a_terminal_and_count_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = ProgressBar(terminal, "replaying")
    for done in range(1, 51):
        bar.update(done, 50)
    bar.close()
    assert terminal.getvalue().endswith(f"\rreplaying [{'#' * 30}] 50/50\n")

    log = io.StringIO()
    bar = ProgressBar(log, "replaying")
    for done in range(1, 251):
        bar.update(done, 250)
    bar.close()
    assert log.getvalue().splitlines() == [
        "replaying: 100/250 dead letters examined",
        "replaying: 200/250 dead letters examined",
        "replaying: 250/250 dead letters examined",
    ]

    quiet = Terminal()
    ProgressBar(quiet, "replaying").update(3, 3)  # a few letters need no bar
    assert quiet.getvalue() == ""


def test_the_table_lines_up() -> None:
    now = datetime.now(UTC)
    table = render_table([make_letter("a", "short", now), make_letter("b" * 8, "x" * 200, now)],
                         now)
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[1].index("provider_unavailable") == lines[2].index("provider_unavailable")
    assert lines[2].endswith("x" * 59 + "…")


def make_letter(letter_id: str, text: str, failed_at: datetime) -> DeadLetter:
    return DeadLetter(
        id=letter_id, body=b"{}", headers={}, properties={}, source="worker",
        error_type="provider_unavailable", error="boom", retry_count=1,
        failed_at=failed_at, community="c1", preview=preview(text),
    )


# -- purge -------------------------------------------------------------------------------


async def test_purge_with_yes_removes_everything(
    prefix: str, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    await three_letters(connection, dlq_topology)
    code, out, err = await waddle("dlq", "purge", "--yes", env=clean_env(prefix))
    assert code == 0, err
    assert f"purged 3 dead letters from {dlq_topology.dead_letter_queue}" in out
    assert await queue_depth(dlq_topology.dead_letter_queue) == 0


async def test_purge_without_yes_and_without_a_terminal_refuses(
    prefix: str, connection: AbstractConnection, dlq_topology: Topology
) -> None:
    await three_letters(connection, dlq_topology)
    code, _, err = await waddle("dlq", "purge", env=clean_env(prefix))
    assert code == 2
    assert "--yes" in err
    assert "not a terminal" in err
    assert await queue_depth(dlq_topology.dead_letter_queue) == 3


@pytest.mark.parametrize(("answer", "code", "left"), [("yes", 0, 0), ("no", 1, 3)])
async def test_purge_on_a_terminal_asks_first(
    prefix: str, connection: AbstractConnection, dlq_topology: Topology,
    answer: str, code: int, left: int,
) -> None:
    await three_letters(connection, dlq_topology)
    controller, terminal = os.openpty()
    try:
        os.write(controller, answer.encode() + b"\n")
        exit_code, _, err = await waddle("dlq", "purge", env=clean_env(prefix), stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert exit_code == code, err
    assert "This removes 3 dead letters" in err
    assert "Type yes to go on" in err
    assert await queue_depth(dlq_topology.dead_letter_queue) == left


# -- end to end ---------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as provider:
        yield provider


async def test_a_letter_replayed_once_the_provider_is_back_gets_its_reply(
    prefix: str, make_settings: Callable[..., Settings], router_client: RouterClient,
    fake: FakeProvider, topology: Topology,
) -> None:
    fake.status = 503
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, ollama_timeout=2)
    event = make_event("hello everyone")
    async with running_worker(settings):
        await router_client.publish(event)
        await wait_for_depth(topology.dead_letter_queue, 1)
        assert fake.calls == 3  # the first try and both retries
        fake.status = None

        code, out, err = await waddle("dlq", "replay", "--all", env=clean_env(prefix))
        assert code == 0, err
        assert "replayed 1" in out

        reply = await router_client.next_reply(15)
    assert reply.correlation_id == event["event_id"]
    assert orjson.loads(reply.body)["event_id"] == event["event_id"]
    assert await queue_depth(topology.dead_letter_queue) == 0
    assert await queue_depth(topology.interaction_queue) == 0


async def test_an_old_letter_replayed_is_still_answered(
    prefix: str, make_settings: Callable[..., Settings], router_client: RouterClient,
    fake: FakeProvider, topology: Topology,
) -> None:
    """The viewer wrote it long ago, but an operator chose to replay it: it is answered."""
    settings = make_settings(ai_provider="ollama", ollama_host=fake.url, max_event_age_s=60)
    event = make_event("hello everyone")
    event["sent_at"] = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    async with await aio_pika.connect_robust(AMQP_URL) as connection:
        await topology.declare(await connection.channel())
        await dead_letter(connection, topology, event)
    async with running_worker(settings):
        box_code, _, err = await waddle("dlq", "replay", "--all", env=clean_env(prefix))
        assert box_code == 0, err
        reply = await router_client.next_reply(15)
    assert reply.correlation_id == event["event_id"]
    assert fake.calls == 1


def test_a_replayed_copy_is_marked_and_loses_the_failure_headers() -> None:
    copied = replay_headers({headers.TRACEPARENT: TRACEPARENT, headers.ERROR: "x",
                             headers.RETRY_COUNT: 2, headers.FIRST_RECEIVED_AT: "t"})
    assert copied[headers.TRACEPARENT] == TRACEPARENT
    assert headers.REPLAYED_AT in copied
    assert headers.ERROR not in copied
    assert headers.RETRY_COUNT not in copied
    assert headers.FIRST_RECEIVED_AT not in copied
