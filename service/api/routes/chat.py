"""OpenAI-compatible ``POST /v1/chat/completions`` (non-streaming and ``stream: true``).

``model`` is the base model id (or ``base``) for no adapter, else an adapter name (``name@3`` pins a
version). Images come as ``image_url`` parts holding data URLs; remote URLs are refused (the server
never fetches). Earlier turns and system messages are given to the model as text before the last
user message; all images of the conversation are attached in order.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.auth import check_adapter
from service.api.deps import DecodedImagesDep, EngineDep, SettingsDep
from service.api.images import DecodedImage, DecodedImages, decode_base64
from service.api.rows import RowStream, error_payload, sse, submit, wait_for_row
from service.config import Settings
from service.engine.jobs import AnswerJob
from service.errors import InvalidInput, PayloadTooLarge

router = APIRouter(tags=["openai"])


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False


def _text_and_images(message: Message, settings: Settings, decoded: DecodedImages, images: list[DecodedImage]) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.image_url is not None:
            if len(images) >= settings.max_images:
                raise PayloadTooLarge(f"at most {settings.max_images} images per request")
            label = f"messages image {len(images)}"
            data = decode_base64(part.image_url.url, settings.max_image_bytes, label)
            images.append(decoded.decode(data, settings.max_image_bytes, settings.max_image_pixels, label))
    return "\n".join(t for t in texts if t)


def _to_job(body: ChatRequest, engine: Any, settings: Settings, decoded: DecodedImages) -> AnswerJob:
    if body.messages[-1].role != "user":
        raise InvalidInput("the last message must come from the user")
    images: list[DecodedImage] = []
    turns = [(m.role, _text_and_images(m, settings, decoded, images)) for m in body.messages]
    instruction = turns[-1][1].strip()
    if not instruction:
        raise InvalidInput("the last user message has no text")
    context = [f"{role}: {text}" if role != "user" else text for role, text in turns[:-1] if text]
    if context:
        instruction = "\n".join([*context, instruction])
    if len(instruction) > settings.max_instruction_chars:
        raise PayloadTooLarge(f"messages exceed {settings.max_instruction_chars} characters of text")
    max_tokens = body.max_completion_tokens or body.max_tokens or 64
    if max_tokens > settings.max_new_tokens:
        raise InvalidInput(f"max_tokens must be at most {settings.max_new_tokens}")
    adapter = None if body.model in (engine.model_id, "base") else body.model
    return AnswerJob(instruction, [d.image for d in images], adapter, max_tokens, body.temperature,
                     image_keys=[d.key for d in images])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, settings: SettingsDep, engine: EngineDep, decoded: DecodedImagesDep):
    try:
        raw = json.loads(await request.body())
        body = ChatRequest.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput("body is not valid JSON") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
    created = int(time.time())

    def job() -> AnswerJob:  # (decodes the images: run in the thread pool, by submit)
        job = _to_job(body, engine, settings, decoded)
        check_adapter(request, job.adapter)
        return job

    if not body.stream:
        row = await submit(engine, job)
        result = await wait_for_row(request, row, settings.request_timeout_s)
        usage = result["usage"]
        return {
            "id": "chatcmpl-" + row.request_id.removeprefix("ans-"),
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result["answer"]},
                "finish_reason": "length" if result["finish_reason"] == "length" else "stop",
            }],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        }

    stream = RowStream()
    row = await submit(engine, job, stream.on_text)
    stream.attach(row)
    chunk_id = "chatcmpl-" + row.request_id.removeprefix("ans-")

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({
            "id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in stream.events(row, settings.request_timeout_s):
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, "length" if value["finish_reason"] == "length" else "stop")
                yield sse("[DONE]")
            else:
                yield sse(error_payload(value))
                yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
