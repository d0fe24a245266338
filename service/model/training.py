"""Training support: one adapter trainable against the frozen base, loss on answer tokens only.

The adapter being trained is an :class:`AdapterWeights` passed through the adapter context, so the
base (and every resident slot) stays frozen and untouched while it trains — serving can go on in
another thread. When training ends, :meth:`AdapterSlots.load` copies it into a slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from service.model.base import BaseModel
from service.model.generate import answer_token_ids, embed_prompts, encode_prompt, left_padded_positions
from service.model.lora.config import AdapterConfig
from service.model.lora.context import adapter_batch
from service.model.lora.weights import AdapterWeights

IGNORE_INDEX = -100


@dataclass
class TrainingExample:
    instruction: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class TrainingBatch:
    """``inputs_embeds`` are built at loss time (images may be cached or need gradients)."""

    token_rows: list[list[int]]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX outside the answers (left padded like the rows)
    images: list[list[Image.Image]]


def cosine_lr(peak: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: cosine decay from ``peak`` towards 0.

    Used by the fine-tuning job and ``service.demo.finetune_adapter`` alike. A function of the step
    alone, so a job resumed from a checkpoint continues on the same schedule.
    """
    return peak * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def trainable_adapter(
    base: BaseModel, config: AdapterConfig, init_from: AdapterWeights | None = None, seed: int | None = None
) -> AdapterWeights:
    """A new adapter whose parameters — and only those — require gradients.

    Freezes every base parameter (the VCE projector included) and returns fresh adapter weights
    (B = 0) or a copy of ``init_from`` to continue training.
    """
    if base.slots is None:
        raise ValueError("the base was loaded without adapter slots")
    base.model.requires_grad_(False)
    adapter = base.slots.new_adapter(config, seed=seed)
    if init_from is not None:
        adapter.load_state_dict(init_from.state_dict())
    adapter.requires_grad_(True)
    adapter.train()
    return adapter


def build_batch(base: BaseModel, examples: list[TrainingExample]) -> TrainingBatch:
    """Tokenise prompt + answer + EOS per example; labels cover the answer and EOS only."""
    rows, label_rows = [], []
    eos = base.tokenizer.eos_token_id
    for ex in examples:
        prompt = encode_prompt(base, ex.instruction, len(ex.images))
        answer = answer_token_ids(base, ex.answer) + [eos]
        if len(prompt) + len(answer) > base.max_context:
            raise ValueError(f"example of {len(prompt) + len(answer)} tokens exceeds the context {base.max_context}")
        rows.append(prompt + answer)
        label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, lab in enumerate(label_rows):
        labels[i, width - len(lab) :] = torch.tensor(lab)
    return TrainingBatch(rows, labels, [list(ex.images) for ex in examples])


def adapter_loss(
    base: BaseModel,
    batch: TrainingBatch,
    adapter: AdapterWeights | None,
    image_features: list[list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over answer tokens with ``adapter`` applied to every row.

    ``image_features`` (per row, per image ``[tokens_per_image, d_llm]``) may be passed in when the
    caller caches them; otherwise the frozen vision tower + VCE encode the batch's images.
    """
    if image_features is None:
        image_features = []
        for imgs in batch.images:
            image_features.append(list(base.encode_images(base.preprocess_images(imgs))) if imgs else [])
    embeds, mask = embed_prompts(base, batch.token_rows, image_features)
    positions = left_padded_positions(mask)
    with adapter_batch(trainable=adapter):
        logits = base.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    labels = batch.labels.to(logits.device)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
