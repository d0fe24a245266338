"""``GET /v1/models``: the base model and the adapters in the store (OpenAI list format)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import EngineDep

router = APIRouter(tags=["inference"])


@router.get("/v1/models")
def list_models(request: Request, engine: EngineDep) -> dict:
    """The base and the adapters this caller's key may use."""
    principal = getattr(request.state, "principal", None)
    data = [{"id": engine.model_id, "object": "model", "owned_by": "service", "kind": "base"}]
    for name in engine.store.names():
        if principal is not None and not principal.may_use(name):
            continue
        data.append(
            {"id": name, "object": "model", "owned_by": "service", "kind": "adapter",
             "live_version": engine.store.live_version(name), "versions": engine.store.versions(name)}
        )
    return {"object": "list", "data": data}
