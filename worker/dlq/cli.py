"""`waddle-ai dlq list|show|replay|purge`: usage checked first, then the broker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

import aio_pika
import orjson
from aio_pika.exceptions import AMQPError

from broker.topology import Topology
from config.settings import Settings
from worker.dlq.box import DeadLetterBox, DeadLetterQueueMissing
from worker.dlq.letters import Selection
from worker.dlq.render import ProgressBar, render_letter, render_table
from worker.errors import describe_failure
from worker.provider_check import unreachable_providers


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
