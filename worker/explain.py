"""`waddle-ai explain EVENT_ID`: what became of an event, asked after the fact.

The worker keeps each event's outcome in its state store (consumers/outcomes.py).
Where to read it:

* With `REDIS_URL`, in Redis, from any machine that reaches it: every
  replica writes there, so one look covers the whole deployment.
* Without (the memory backend), outcomes live inside the worker process. The
  worker's sidecar serves them at `GET /outcomes/<event_id>`, so `explain`
  asks it: `http://127.0.0.1:SIDECAR_PORT` by default, or `--sidecar URL` for a
  worker elsewhere. With several memory-backed replicas, each one knows only
  the events it handled.

`--sidecar` also works with Redis, as a second place to look (a replica that
had fallen back to memory while Redis was down).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from config.settings import Settings
from consumers.outcomes import decode_outcome, describe_outcome
from context.store import StateStore
from schemas.errors import WaddleError

SIDECAR_TIMEOUT_S = 3.0


def outcome_routes(store: StateStore) -> list[web.RouteDef]:
    """`GET /outcomes/{event_id}` on the sidecar: the outcome JSON, or 404."""

    async def outcome(request: web.Request) -> web.Response:
        event_id = request.match_info["event_id"]
        found = await store.get_outcome(event_id)
        if found is None:
            return web.json_response({"error": {
                "message": f"no outcome known for event {event_id} (kept OUTCOME_TTL_S)",
                "type": "invalid_request_error", "param": None, "code": "outcome_not_found",
            }}, status=404)
        return web.Response(body=found, content_type="application/json")

    return [web.get("/outcomes/{event_id}", outcome)]


class OutcomeUnavailable(WaddleError):
    """No place to look answered; the message names the setting to check."""


class OutcomeLookup:
    """Reads outcomes from Redis and/or a worker's sidecar, as the settings say."""

    def __init__(self, settings: Settings, sidecar_url: str | None = None) -> None:
        self._store: StateStore | None = None
        if settings.redis_url:
            from context.redis_store import RedisStateStore

            self._store = RedisStateStore.from_url(
                settings.redis_url, settings.redis_key_prefix, socket_connect_timeout=2.0)
        self._sidecar = sidecar_url.rstrip("/") if sidecar_url else None
        if self._sidecar is None and not settings.redis_url and settings.sidecar_port:
            self._sidecar = f"http://127.0.0.1:{settings.sidecar_port}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def places(self) -> list[str]:
        found = ["redis (REDIS_URL)"] if self._store is not None else []
        if self._sidecar is not None:
            found.append(f"the worker's sidecar at {self._sidecar}")
        return found

    async def get(self, event_id: str) -> dict[str, Any] | None:
        """The outcome, None if no place knows it; OutcomeUnavailable if none answered."""
        if self._store is None and self._sidecar is None:
            raise OutcomeUnavailable(
                "without REDIS_URL, outcomes live in the worker process: give "
                "--sidecar http://HOST:PORT (the worker's SIDECAR_PORT)")
        if self._store is not None:
            try:
                raw = await self._store.get_outcome(event_id)
            except Exception as exc:
                raise OutcomeUnavailable(
                    f"cannot read outcomes from Redis (REDIS_URL): {_short(exc)}") from exc
            if raw is not None:
                return decode_outcome(raw)
        if self._sidecar is not None:
            return await self._from_sidecar(event_id)
        return None

    async def _from_sidecar(self, event_id: str) -> dict[str, Any] | None:
        assert self._sidecar is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=SIDECAR_TIMEOUT_S))
        url = f"{self._sidecar}/outcomes/{event_id}"
        try:
            async with self._session.get(url) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise OutcomeUnavailable(
                        f"{url} answered HTTP {response.status}; is that a waddle-ai "
                        "sidecar (SIDECAR_PORT, or --sidecar)?")
                return decode_outcome(await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OutcomeUnavailable(
                f"cannot reach the worker's sidecar at {self._sidecar} ({_short(exc)}); is "
                "`waddle-ai run` running there (SIDECAR_PORT, or --sidecar URL)?") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._store is not None:
            await self._store.aclose()


def _short(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def add_parser(commands: Any) -> None:
    explain = commands.add_parser(
        "explain", help="what became of an event: its reply, or why there was none")
    explain.add_argument("event_id", help="the event id `publish` printed")
    add_sidecar_option(explain)
    explain.add_argument("--json", action="store_true", help="print the outcome as JSON")


def add_sidecar_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sidecar", default=None, metavar="URL",
        help="a worker's sidecar to ask for outcomes (default without REDIS_URL: "
             "http://127.0.0.1:SIDECAR_PORT)")


async def run_explain(settings: Settings, args: argparse.Namespace) -> int:
    lookup = OutcomeLookup(settings, args.sidecar)
    try:
        try:
            record = await lookup.get(args.event_id)
        except OutcomeUnavailable as exc:
            print(f"waddle-ai: {exc}", file=sys.stderr)
            return 1
    finally:
        await lookup.aclose()
    if record is None:
        print(f"waddle-ai: no outcome known for event {args.event_id} in "
              f"{' or '.join(lookup.places)}. Outcomes are kept OUTCOME_TTL_S "
              f"({settings.outcome_ttl_s} s); an event still waiting in the queue has none "
              "yet.", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
    else:
        print(describe_outcome(record))
    return 0
