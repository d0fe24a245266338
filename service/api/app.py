"""The FastAPI application: routers, error mapping, and loading the engine in the background."""

from __future__ import annotations

import importlib
import logging
import math
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.auth import Authenticator, require, require_read_or_write
from service.api.images import DecodedImages
from service.api.request_log import RequestLog
from service.api.routes import adapters, answer, chat, finetune, health, models
from service.api.routes import metrics as metrics_route
from service.config import Settings
from service.errors import ServiceError, Unauthorized
from service.training.jobs import JobStore, database_url
from service.training.queue import make_queue

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
            engine = engine_factory(settings)
            if settings.embedded_trainer and hasattr(engine, "base"):
                worker = importlib.import_module("service.training.worker")
                app.state.consumer = worker.start_embedded_trainer(
                    engine.base, settings, app.state.jobs, app.state.queue, app.state.finetune_task)
            app.state.engine = engine
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
        if app.state.consumer is not None:
            app.state.consumer.stop(graceful=False)
        if app.state.engine is not None and hasattr(app.state.engine, "close"):
            app.state.engine.close()

    app = FastAPI(title="MLLM adapter service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.decoded_images = DecodedImages(settings.decoded_image_cache_mb * 2**20)
    app.state.engine = None
    app.state.load_error = None
    app.state.consumer = None
    app.state.jobs = JobStore(database_url(settings.data_dir, settings.database_url))
    app.state.queue, app.state.finetune_task = make_queue(settings.data_dir, settings.redis_url)
    app.state.auth = Authenticator(settings.api_keys_file, settings.rate_limit_per_minute)
    infer, admin = [Depends(require("infer"))], [Depends(require("admin"))]
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    app.include_router(answer.router, dependencies=infer)
    app.include_router(chat.router, dependencies=infer)
    app.include_router(models.router, dependencies=infer)
    app.include_router(adapters.router, dependencies=[Depends(require_read_or_write("infer", "admin"))])
    app.include_router(finetune.router, dependencies=admin)

    app.add_middleware(RequestLog)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        response = _error(exc.status, exc.code, exc.message)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

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
