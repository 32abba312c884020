"""The HTTP sidecar: liveness, readiness and Prometheus metrics (aiohttp).

Liveness says the process and its event loop answer. Readiness says this
replica takes work: 200 only while the consumer is attached, with each
dependency's state in the JSON body so an operator sees why it is not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from observability.metrics import Metrics
from worker.http_errors import json_errors

ReadinessCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class Sidecar:
    def __init__(
        self, *, host: str, port: int, metrics: Metrics, readiness: ReadinessCheck,
        extra_routes: list[web.RouteDef] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._readiness = readiness
        self._app = web.Application(middlewares=[json_errors])
        self._app.add_routes([
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics_view),
            *(extra_routes or []),
        ])
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    def routes(self) -> list[tuple[str, str]]:
        """(method, path template) of every route served; the OpenAPI test compares them."""
        return [(route.method, route.resource.canonical)
                for route in self._app.router.routes() if route.resource is not None]

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # the bound socket tells the real port when 0 was asked
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, detail = await self._readiness()
        return web.json_response(
            {"status": "ready" if ready else "not_ready", **detail},
            status=200 if ready else 503,
        )

    async def _metrics_view(self, _: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.render())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response
