"""Fine-tuning hyperparameters, validated before a job is queued (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["dual_lora", "lora"] = Field("dual_lora", description="adapter kind")
    rank: int = Field(16, ge=1, le=256, description="adapter rank r")
    alpha: float = Field(32.0, gt=0, le=4096, description="scale s = alpha / r")
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="peak AdamW rate; cosine decay to 0 over the run")
    batch_size: int = Field(8, ge=1, le=128)
    validation_split: float = Field(0.1, ge=0.0, le=0.5, description="fraction held out for validation")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    promote: Literal["always", "if_better"] = "always"
    target_modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="LLM linears to adapt; default: every module the base has slots on"
    )
    checkpoint_every: int = Field(50, ge=1, le=100_000, description="steps between resumable checkpoints")
