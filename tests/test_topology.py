"""Topology details that depend on the broker."""

from __future__ import annotations

import aio_pika
import pytest

from broker.topology import Topology, broker_major_version
from tests.conftest import AMQP_URL


def test_the_dlq_has_no_delivery_limit_on_rabbitmq_4_and_none_set_on_3() -> None:
    assert Topology.dead_letter_arguments(4) == {"x-queue-type": "quorum", "x-delivery-limit": -1}
    assert Topology.dead_letter_arguments(3) == {"x-queue-type": "quorum"}


async def test_the_broker_version_is_read_from_the_handshake() -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        assert await broker_major_version(await connection.channel()) >= 3
    finally:
        await connection.close()


async def test_delete_removes_everything_declare_created(prefix: str) -> None:
    topology = Topology(prefix=prefix, retry_delays_ms=(1000, 2000))
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        await topology.declare(await connection.channel())
        await topology.delete(await connection.channel())
        names = [topology.interaction_queue, topology.dead_letter_queue,
                 topology.completions_queue, *topology.retry_queues]
        for name in names:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(name, passive=True)
        for name in (topology.responses_exchange, topology.dead_letter_exchange):
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_exchange(name, passive=True)
    finally:
        await connection.close()
