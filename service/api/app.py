"""The FastAPI application: routers, error mapping, and loading the engine in the background."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.routes import answer, health, models
from service.config import Settings
from service.errors import ServiceError

log = logging.getLogger(__name__)


def _default_engine_factory(settings: Settings) -> Any:
    # Imported here so that importing the API never imports torch.
    return importlib.import_module("service.engine.engine").Engine(settings)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(
    settings: Settings | None = None,
    engine_factory: Callable[[Settings], Any] = _default_engine_factory,
    load_in_background: bool = True,
) -> FastAPI:
    settings = settings or Settings()

    def load() -> None:
        try:
            app.state.engine = engine_factory(settings)
        except Exception as exc:  # reported by /readyz and every request, never a crash
            log.exception("model failed to load")
            app.state.load_error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=load, name="engine-loader", daemon=True).start()
        else:
            load()
        yield

    app = FastAPI(title="MLLM adapter service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.load_error = None
    for router in (health.router, answer.router, models.router):
        app.include_router(router)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return _error(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal_error", "internal error; see the server log")

    return app
