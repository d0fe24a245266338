"""Plain descriptions of engine work (no torch, so the HTTP layer can build them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class AnswerJob:
    instruction: str
    images: list[Image.Image] = field(default_factory=list)
    adapter: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
