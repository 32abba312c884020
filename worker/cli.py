"""`waddle-ai` (also `python -m worker`): run the worker and operate it.

Exit codes: 0 done, 1 the operation failed (no reply, a service unreachable,
broker refused), 2 bad usage or bad settings. A failure is one line on stderr
naming what failed and the setting to change (worker/errors.py); the
traceback follows only with LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import orjson

from broker.topology import TopologyError
from config.settings import Settings, SettingsError, load_settings
from observability.logs import configure_logging
from schemas.events import MessageType, Platform
from worker import config_cli, explain
from worker.dlq import cli as dlq
from worker.errors import describe_failure

# How often `publish --wait` asks for the event's outcome while it waits.
OUTCOME_POLL_S = 0.25


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waddle-ai",
        description="AI interaction worker: chat events in from RabbitMQ, replies out.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("run", help="run the worker and its sidecar until SIGTERM/SIGINT")
    commands.add_parser("topology", help="declare the queues and exchanges, and print them")

    publish = commands.add_parser("publish", help="publish one event as the router would")
    publish.add_argument("text", help="the chat message")
    publish.add_argument("--community", default="dev-community")
    publish.add_argument("--platform", default="twitch", choices=[p.value for p in Platform])
    publish.add_argument("--channel", default="dev-channel")
    publish.add_argument("--user", default="dev-user")
    publish.add_argument("--display-name", default=None)
    publish.add_argument("--type", dest="message_type", default="chatMessage",
                         choices=[t.value for t in MessageType])
    publish.add_argument("--metadata", default=None,
                         help='event metadata as JSON, e.g. \'{"bits": 100}\'')
    publish.add_argument("--wait", action="store_true", help="wait for the reply and print it")
    publish.add_argument("--timeout", type=float, default=60.0,
                         help="seconds --wait waits (default 60)")
    explain.add_sidecar_option(publish)

    explain.add_parser(commands)
    dlq.add_parser(commands)
    config_cli.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"waddle-ai: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format.value,
                      user_hash_key=settings.log_hash_key)
    if settings.log_level != "DEBUG":
        # aiormq logs every refused connection itself; the failure reaches us
        # as an exception and is said once, with the setting to change (at
        # start, below; while running, as "broker connection lost").
        logging.getLogger("aiormq.connection").addFilter(_not_transport_errors)
    handlers = {
        "run": _run, "topology": _topology, "publish": _publish, "dlq": _dlq,
        "migrate": config_cli.run_migrate, "config": config_cli.run_config,
        "explain": explain.run_explain,
    }
    _install_fast_loop()
    try:
        return asyncio.run(handlers[args.command](settings, args))
    except TopologyError as exc:
        print(f"waddle-ai: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `waddle-ai dlq list | head`: the reader left; that is not an error. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        failure = describe_failure(exc, settings)
        print(f"waddle-ai: {failure.message}", file=sys.stderr)
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            traceback.print_exception(exc, file=sys.stderr)
        return failure.exit_code


def _not_transport_errors(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("error when creating transport")


def _install_fast_loop() -> None:
    """uvloop when installed (the `fast` extra): cheaper I/O per message."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _run(settings: Settings, _: argparse.Namespace) -> int:
    from worker.app import App

    app = await App.build(settings)
    await app.run_until_signalled()
    return 0


async def _topology(settings: Settings, _: argparse.Namespace) -> int:
    import aio_pika

    from worker.app import topology_for

    topology = topology_for(settings)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        await topology.declare(await connection.channel())
    finally:
        await connection.close()
    for row in topology.describe():
        arguments = " ".join(f"{k}={v}" for k, v in row["arguments"].items())
        bound = f"  bound: {row['bound']}" if "bound" in row else ""
        print(f"{row['name']:<40} {row['kind']:<16} {arguments}{bound}")
    return 0


async def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from worker.app import topology_for
    from worker.client import RouterClient, make_event

    metadata: dict[str, Any] = {}
    if args.metadata:
        try:
            metadata = orjson.loads(args.metadata)
        except orjson.JSONDecodeError as exc:
            print(f"waddle-ai: --metadata is not JSON: {exc}", file=sys.stderr)
            return 2
    event = make_event(
        args.text, community=args.community, platform=args.platform, channel=args.channel,
        user=args.user, display_name=args.display_name, message_type=args.message_type,
        metadata=metadata,
    )
    client = await RouterClient.connect(settings.amqp_url, topology_for(settings))
    try:
        if args.wait:
            await client.listen(f"{args.platform}.{args.community}")
        await client.publish(event)
        event_id = str(event["event_id"])
        print(f"published event {event_id}", file=sys.stderr)
        if not args.wait:
            print(f"its reply goes to {topology_for(settings).responses_exchange}: without a "
                  "router (or --wait) bound to it, the reply is unroutable, retried and then "
                  f"dead-lettered. `waddle-ai explain {event_id}` tells what became of it.",
                  file=sys.stderr)
            return 0
        return await _wait_for_fate(settings, args, client, event_id)
    finally:
        await client.aclose()


async def _wait_for_fate(
    settings: Settings, args: argparse.Namespace, client: Any, event_id: str
) -> int:
    """The reply, or as soon as the worker decided there is none, why not.

    Replies come on our own bound queue; outcomes are read where `explain`
    reads them (Redis, or the worker's sidecar). Progress (a retry, a wait
    behind another copy) is shown and the wait goes on; a reply or a final
    "no" ends it.
    """
    from consumers.outcomes import DEAD_LETTERED, NO_REPLY, describe_outcome
    from worker.explain import OutcomeLookup, OutcomeUnavailable

    lookup = OutcomeLookup(settings, args.sidecar)
    reply_task = asyncio.ensure_future(client.wait_for(event_id, args.timeout))
    shown: str | None = None
    last: dict[str, Any] | None = None
    can_look = bool(lookup.places)
    try:
        while not reply_task.done():
            await asyncio.wait({reply_task}, timeout=OUTCOME_POLL_S)
            if reply_task.done() or not can_look:
                break
            try:
                record = await lookup.get(event_id)
            except OutcomeUnavailable as exc:
                print(f"waddle-ai: {exc}; waiting for the reply alone", file=sys.stderr)
                can_look = False
                continue
            if record is None:
                continue
            last = record
            if record.get("status") in (NO_REPLY, DEAD_LETTERED):
                reply_task.cancel()
                print(describe_outcome(record), file=sys.stderr)
                return 1
            line = describe_outcome(record)
            if line != shown and record.get("status") != "replied":
                print(line, file=sys.stderr)
                shown = line
        reply = await reply_task
    finally:
        if not reply_task.done():
            reply_task.cancel()
        await lookup.aclose()
    if reply is None:
        known = f" Last known: {describe_outcome(last)}." if last is not None else ""
        print(
            f"waddle-ai: no reply within {args.timeout:g} s.{known} Is a worker running "
            "(`waddle-ai run`)? Events without a trigger, in a cooldown or from bots get "
            f"no reply by design; `waddle-ai explain {event_id}` says which.",
            file=sys.stderr,
        )
        return 1
    print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    return 0


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from worker.app import topology_for

    return await dlq.command(settings, args, topology_for(settings))
