"""``POST /v1/answer``: one instruction, zero or more images, an optional adapter."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api.auth import check_adapter
from service.api.deps import DecodedImagesDep, EngineDep, SettingsDep
from service.api.images import DecodedImage, DecodedImages, cheap_to_decode, decode_base64, small_base64
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


async def _parse(request: Request, settings: Settings,
                 decoded: DecodedImages) -> tuple[AnswerRequest, Callable[[], list[DecodedImage]], bool]:
    """The request's fields, what decodes its images (CPU work, for the thread pool), and whether
    that is cheap enough to run on the event loop: every image decoded before
    (:class:`~service.api.images.DecodedImages`), or small ones (:func:`~service.api.images.cheap_to_decode`)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput("body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise InvalidInput("body must be a JSON object")
        body = _validated(data, settings)
        if not small_base64(body.images):
            return body, lambda: [
                decoded.decode(decode_base64(text, settings.max_image_bytes, f"images[{i}]"), settings.max_image_bytes,
                               settings.max_image_pixels, f"images[{i}]")
                for i, text in enumerate(body.images)
            ], False
        # (base64-decoded here, once; the images maybe here too)
        payloads = [decode_base64(text, settings.max_image_bytes, f"images[{i}]") for i, text in enumerate(body.images)]
        return (body, *_decoder(payloads, "images", settings, decoded))
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_images + 1, max_fields=32)
        files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
        fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
        body = _validated({**fields, "images": []}, settings)
        if len(files) > settings.max_images:
            raise PayloadTooLarge(f"at most {settings.max_images} images per request")
        uploads = [await upload.read(settings.max_image_bytes + 1) for upload in files]
        return (body, *_decoder(uploads, "image", settings, decoded))
    raise UnsupportedMedia("send application/json or multipart/form-data")


def _decoder(payloads: list[bytes], field: str, settings: Settings,
             decoded: DecodedImages) -> tuple[Callable[[], list[DecodedImage]], bool]:
    """What decodes ``payloads`` (taking the ones decoded before as they are), and whether that is
    cheap enough for the event loop."""
    known, looked_up = decoded.known(payloads)
    if all(image is not None for image in known):
        return lambda: known, True

    def decode() -> list[DecodedImage]:
        return [
            image or decoded.decode(data, settings.max_image_bytes, settings.max_image_pixels, f"{field}[{i}]",
                                    look_up=not looked_up)
            for i, (image, data) in enumerate(zip(known, payloads, strict=True))
        ]

    return decode, cheap_to_decode([data for image, data in zip(known, payloads, strict=True) if image is None])


@router.post("/v1/answer", response_model=AnswerResponse, responses=ERRORS)
async def answer(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    decoded: DecodedImagesDep,
    adapter: str | None = Query(None, description="adapter name or name@version; overrides the body"),
):
    body, decode_images, cheap = await _parse(request, settings, decoded)
    adapter = adapter if adapter is not None else body.adapter
    check_adapter(request, adapter)

    def job() -> AnswerJob:
        images = decode_images()
        return AnswerJob(instruction=body.instruction, images=[d.image for d in images], adapter=adapter,
                         max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                         image_keys=[d.key for d in images])

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
