"""bench/answer_tokens.py: the token that names each defect type, and teacher-forced probabilities
that agree with the training loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import load_bench_script

DEMO_BASE = Path(__file__).resolve().parents[1] / "service" / "assets" / "demo-base"


def _module():
    return load_bench_script("answer_tokens")


@pytest.mark.parametrize(
    ("defect_type", "naming"),
    # with the demo tokenizer: " defect", ":", " s", "c" (scratch) vs " s", "p" (spot); " c", "rack" vs " c", "h"
    [("scratch", "c"), ("spot", "p"), ("crack", "rack"), ("chip", "h"), ("missing_hole", "Ġ")],
)
def test_naming_token_is_where_a_type_parts_from_every_other(defect_type, naming):
    from service.model.base import load_base

    module = _module()
    base = load_base(DEMO_BASE, n_slots=0)
    k = module.naming_position(base, defect_type)
    ids = module.answer_token_ids(base, f"defect: {defect_type}, top-left")
    assert base.tokenizer.convert_ids_to_tokens([ids[k]]) == [naming]


def test_token_probabilities_agree_with_the_training_loss(tiny_base):
    from service.model.lora import AdapterConfig
    from service.model.training import TrainingExample, adapter_loss, build_batch, trainable_adapter
    from service.world import generate_examples

    module = _module()
    adapter = trainable_adapter(tiny_base, AdapterConfig(peft_type="DUAL_LORA", r=4, lora_alpha=8), seed=0)
    with torch.no_grad():  # a non-zero adapter, so the check covers the adapter path
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    size = tiny_base.model.config.vision_config.image_size
    image, record = generate_examples(1, 7, kind="inspection", size=size)[0]
    with torch.no_grad():
        probs = module.token_probabilities(tiny_base, adapter, image, record["instruction"], record["answer"])
        batch = build_batch(tiny_base, [TrainingExample(record["instruction"], record["answer"], [image])])
        loss = adapter_loss(tiny_base, batch, adapter).item()
    assert len(probs) == len(module.answer_token_ids(tiny_base, record["answer"])) + 1  # and EOS
    assert math.isclose(-probs.log().mean().item(), loss, rel_tol=1e-4)
