"""Counting what a Redis client writes: proof that an operation is one round trip."""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import Connection
from redis.typing import EncodableT


class WireLog:
    """What one client wrote to Redis: writes are round trips, commands their contents."""

    def __init__(self) -> None:
        self.writes = 0
        self.commands: list[str] = []

    def reset(self) -> None:
        self.writes = 0
        self.commands.clear()


class RecordingConnection(Connection):
    def __init__(self, *, wire_log: WireLog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wire_log = wire_log

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.wire_log.writes += 1
        await super().send_packed_command(command, check_health)

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        name = args[0]
        self.wire_log.commands.append(name.decode() if isinstance(name, bytes) else str(name))
        return super().pack_command(*args)
