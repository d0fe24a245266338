"""The demo adapter's training loop (shared by finetune_adapter and bench/vision_adapter.py)."""

from __future__ import annotations

import math

import torch
from PIL import Image

from service.demo.finetune_adapter import train_adapter
from service.model.lora import AdapterConfig
from service.model.training import TrainingExample, adapter_loss, build_batch, trainable_adapter

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def test_every_epoch_sees_every_example_once_and_the_loss_falls(tiny_base):
    examples = [(Image.new("RGB", (32, 32), rgb), {"instruction": "What colour?", "answer": name})
                for name, rgb in COLOURS.items() for _ in range(3)]
    features = list(tiny_base.encode_images(tiny_base.preprocess_images([im for im, _ in examples])))
    adapter = trainable_adapter(tiny_base, AdapterConfig(r=4, lora_alpha=8), seed=0)
    batch = build_batch(tiny_base, [TrainingExample(r["instruction"], r["answer"], [im]) for im, r in examples])
    with torch.no_grad():
        before = adapter_loss(tiny_base, batch, adapter, [[f] for f in features]).item()

    seen: list[list[int]] = []

    def lookup(idx: list[int]) -> list[torch.Tensor]:
        seen.append(list(idx))
        return [features[i] for i in idx]

    steps, last = train_adapter(tiny_base, adapter, examples, lookup, epochs=3, batch_size=4, lr=1e-2, seed=0)

    assert steps == 3 * 3 and len(seen) == steps  # ceil(9 / 4) = 3 batches an epoch
    for epoch in range(3):
        assert sorted(i for idx in seen[3 * epoch : 3 * epoch + 3] for i in idx) == list(range(9))
    with torch.no_grad():
        after = adapter_loss(tiny_base, batch, adapter, [[f] for f in features]).item()
    assert math.isfinite(last) and after < before
