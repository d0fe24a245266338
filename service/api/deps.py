"""FastAPI dependencies as ``Annotated`` types."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from service.api.images import DecodedImages
from service.config import Settings
from service.errors import NotReady

# Dependencies that never block are ``async``: FastAPI runs a plain ``def`` dependency in its
# thread pool, a round trip between threads for every request on the cores the model runs on.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Any:
    engine = request.app.state.engine
    if engine is None:
        error = request.app.state.load_error
        raise NotReady(f"model failed to load: {error}" if error else "model is still loading")
    return engine


async def get_decoded_images(request: Request) -> DecodedImages:
    return request.app.state.decoded_images


SettingsDep = Annotated[Settings, Depends(get_settings)]
DecodedImagesDep = Annotated[DecodedImages, Depends(get_decoded_images)]
EngineDep = Annotated[Any, Depends(get_engine)]
