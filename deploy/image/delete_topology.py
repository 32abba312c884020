"""Delete the queues and exchanges of one QUEUE_PREFIX: what `make image-check`
left on the shared broker. Run inside the image (`python - < this file`), so it
needs nothing from the host. Refuses the prefixes a real deployment uses."""

from __future__ import annotations

import asyncio
import sys

import aio_pika

from config.settings import Settings
from worker.app import topology_for


async def delete(settings: Settings) -> None:
    topology = topology_for(settings)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        await topology.delete(await connection.channel())
    finally:
        await connection.close()


def main() -> int:
    settings = Settings()
    if not settings.queue_prefix.startswith("image-check-"):
        print(f"delete_topology: refusing prefix {settings.queue_prefix!r}", file=sys.stderr)
        return 2
    asyncio.run(delete(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
