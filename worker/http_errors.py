"""JSON errors for everything the sidecar answers, in OpenAI's error shape.

aiohttp answers an unknown route or method with a text/plain `404: Not Found`
or `405: Method Not Allowed`, and an uncaught exception with a text/plain
500. An OpenAI client (and any tool reading the OpenAPI document) expects
`{"error": {"message", "type", "param", "code"}}` everywhere, so this
middleware rewrites those, keeping the status and headers (`Allow` on 405).
Handlers that already answer JSON errors are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CODES = {404: "not_found", 405: "method_not_allowed"}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(request, exc.status, exc.reason, allow=exc.headers.get("Allow"))
    except ConnectionError:
        raise  # the client left: there is no one to answer
    except Exception:
        log.exception("sidecar request crashed", extra={
            "action": "http_request", "path": request.path})
        return _error_response(request, 500, "internal error; see the worker's logs")


def _error_response(
    request: web.Request, status: int, reason: str, *, allow: str | None = None,
) -> web.Response:
    if status == 404:
        message = f"no such route: {request.method} {request.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = reason
    body = {"error": {
        "message": message,
        "type": "server_error" if status >= 500 else "invalid_request_error",
        "param": None,
        "code": _CODES.get(status, "internal_error" if status >= 500 else "invalid_request"),
    }}
    return web.Response(body=orjson.dumps(body), status=status,
                        headers={"Allow": allow} if allow is not None else None,
                        content_type="application/json")
