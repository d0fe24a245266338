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
    # Content keys of ``images`` when the caller has them (the HTTP layer hashes the uploaded bytes),
    # naming them in the engine's image caches; None: the engine hashes the pixels.
    image_keys: list[str] | None = None
