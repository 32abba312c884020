"""`python -m bench fake`: the project's fake provider in a process of its own.

The harness drives it over stdin, one command a line, and reads one JSON line
back for each: `latency 0.05`, `stats`, `reset` (stats, then zero them). It
prints `{"url": ...}` once it listens. It stops when stdin closes or on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Mapping

import orjson

from tests.fake_provider import Behaviour, FakeProvider


def _say(payload: Mapping[str, object]) -> None:
    sys.stdout.write(orjson.dumps(payload).decode() + "\n")
    sys.stdout.flush()


async def serve(latency_s: float) -> None:
    # record=False: a benchmark must not keep every request body in memory.
    fake = FakeProvider(Behaviour(latency_s=latency_s), record=False)
    await fake.start()
    _say({"url": fake.url})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while line := (await reader.readline()).decode().strip():
            word, _, arg = line.partition(" ")
            if word == "latency":
                fake.latency_s = float(arg)
            stats = {"calls": fake.calls, "max_in_flight": fake.max_in_flight,
                     "in_flight": fake.in_flight, "latency_s": fake.latency_s}
            if word == "reset":
                fake.calls = 0
                fake.max_in_flight = fake.in_flight
            _say(stats)
        stop.set()

    task = asyncio.create_task(commands())
    try:
        await stop.wait()
    finally:
        task.cancel()
        await fake.stop()
