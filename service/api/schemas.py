"""Request and response bodies of the public API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(..., min_length=1, description="what to ask about the images")
    images: list[str] = Field(default_factory=list, description="base64 or data:image/...;base64 URLs")
    adapter: str | None = Field(None, description="adapter name, name@version, or base/absent for none")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    stream: bool = Field(False, description="server-sent events: text deltas, then the full response")


class AdapterInfo(BaseModel):
    name: str
    version: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timing(BaseModel):
    """Where a request's time went, in milliseconds; the batch's stages are shared by its rows."""

    queue: float = Field(..., description="waiting for a batch")
    batch: float = Field(..., description="the whole batch this row ran in")
    vision: float = Field(..., description="vision tower + VCE for the batch's new images")
    prefill: float
    decode: float
    batch_size: int = Field(..., description="rows in that batch")


class AnswerResponse(BaseModel):
    id: str
    answer: str
    adapter: AdapterInfo | None
    finish_reason: str
    usage: Usage
    timing_ms: Timing


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
