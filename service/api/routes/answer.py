"""``POST /v1/answer``: one instruction, zero or more images, an optional adapter."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api.auth import check_adapter
from service.api.deps import EngineDep, SettingsDep
from service.api.images import cheap_to_decode, decode_base64, decode_base64_image, decode_image, small_base64
from service.api.rows import RowStream, error_payload, sse, submit, wait_for_row
from service.api.schemas import AnswerRequest, AnswerResponse, ErrorResponse
from service.config import Settings
from service.engine.jobs import AnswerJob
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia

router = APIRouter(tags=["inference"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503)}


def _validated(data: dict, settings: Settings) -> AnswerRequest:
    try:
        body = AnswerRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"{where}: {first['msg']}") from exc
    if not body.instruction.strip():
        raise InvalidInput("instruction must not be empty")
    if len(body.instruction) > settings.max_instruction_chars:
        raise PayloadTooLarge(f"instruction exceeds {settings.max_instruction_chars} characters")
    if body.max_new_tokens > settings.max_new_tokens:
        raise InvalidInput(f"max_new_tokens must be at most {settings.max_new_tokens}")
    if len(body.images) > settings.max_images:
        raise PayloadTooLarge(f"at most {settings.max_images} images per request")
    return body


async def _parse(request: Request, settings: Settings) -> tuple[AnswerRequest, Callable[[], list], bool]:
    """The request's fields, what decodes its images (CPU work, for the thread pool), and whether
    that is cheap enough to run on the event loop (:func:`~service.api.images.cheap_to_decode`)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput("body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise InvalidInput("body must be a JSON object")
        body = _validated(data, settings)
        if small_base64(body.images):  # (base64-decoded here, once; the images maybe here too)
            payloads = [decode_base64(text, settings.max_image_bytes, f"images[{i}]") for i, text in enumerate(body.images)]
            return body, lambda: [
                decode_image(data, settings.max_image_bytes, settings.max_image_pixels, f"images[{i}]")
                for i, data in enumerate(payloads)
            ], cheap_to_decode(payloads)
        return body, lambda: [
            decode_base64_image(text, settings.max_image_bytes, settings.max_image_pixels, f"images[{i}]")
            for i, text in enumerate(body.images)
        ], False
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_images + 1, max_fields=32)
        files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
        fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
        body = _validated({**fields, "images": []}, settings)
        if len(files) > settings.max_images:
            raise PayloadTooLarge(f"at most {settings.max_images} images per request")
        uploads = [await upload.read(settings.max_image_bytes + 1) for upload in files]
        return body, lambda: [
            decode_image(data, settings.max_image_bytes, settings.max_image_pixels, f"image[{i}]")
            for i, data in enumerate(uploads)
        ], cheap_to_decode(uploads)
    raise UnsupportedMedia("send application/json or multipart/form-data")


@router.post("/v1/answer", response_model=AnswerResponse, responses=ERRORS)
async def answer(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    adapter: str | None = Query(None, description="adapter name or name@version; overrides the body"),
):
    body, decode_images, cheap = await _parse(request, settings)
    adapter = adapter if adapter is not None else body.adapter
    check_adapter(request, adapter)

    def job() -> AnswerJob:
        return AnswerJob(instruction=body.instruction, images=decode_images(), adapter=adapter,
                         max_new_tokens=body.max_new_tokens, temperature=body.temperature)

    if not body.stream:
        row = await submit(engine, job, inline=cheap)
        return await wait_for_row(request, row, settings.request_timeout_s)

    stream = RowStream()
    row = await submit(engine, job, stream.on_text, inline=cheap)
    stream.attach(row)

    async def events():
        async for kind, value in stream.events(row, settings.request_timeout_s):
            if kind == "text":
                yield sse({"id": row.request_id, "delta": value})
            elif kind == "done":
                yield sse(value, event="done")
            else:
                yield sse(error_payload(value), event="error")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
