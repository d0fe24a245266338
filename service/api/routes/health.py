"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    if state.engine is not None:
        return JSONResponse({"status": "ready", "model": state.engine.model_id})
    if state.load_error:
        body = {"error": {"code": "not_ready", "message": f"model failed to load: {state.load_error}"}}
    else:
        body = {"error": {"code": "not_ready", "message": "model is still loading"}}
    return JSONResponse(body, status_code=503)
