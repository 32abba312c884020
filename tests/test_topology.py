"""Topology details that depend on the broker."""

from __future__ import annotations

import aio_pika

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
