"""Pure ASGI middleware: a request id on every response, metrics and one structured log line per request.

Pure ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs each
request's app in an extra task with its own body streams, which is measurable event-loop work per
request when the loop shares two cores with the model. The time recorded runs to the end of the
response body (for a stream, to its last event).
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

log = logging.getLogger("service.api.app")


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex[:16]
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before it responds

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            path = getattr(scope.get("route"), "path", "unmatched")  # the route template, set by the router
            metrics.REQUESTS.labels(path, str(status)).inc()
            metrics.LATENCY.labels(path).observe(elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info(json.dumps({"request_id": request_id, "method": scope["method"], "path": scope["path"],
                                     "status": status, "ms": round(elapsed * 1e3, 1)}))
