"""One lifecycle: start() opens on an exit stack, so a failed start closes what it opened.

A start that fails half-way (here: the broker refuses the topology, because
the queue exists with other arguments) must not leave a broker connection
open behind it; stop() afterwards still closes what build() made.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.topology import TopologyError
from config.settings import Settings
from worker.app import App


async def test_a_start_that_fails_half_way_closes_what_it_opened(
    make_settings: Callable[..., Settings], broker_cleanup: None
) -> None:
    first = await App.build(make_settings())
    await first.start()
    await first.stop()

    app = await App.build(make_settings(delivery_limit=3))  # the queue says otherwise
    with pytest.raises(TopologyError, match="exists with other arguments"):
        await app.start()
    opened = app.connections
    assert set(opened) == {"publish"}  # it got as far as the first connection
    assert all(connection.is_closed for connection in opened.values())
    assert app.sidecar is None  # never started, so nothing is listening
    assert await app.stop() is True  # nothing in flight; build()'s part closes too
