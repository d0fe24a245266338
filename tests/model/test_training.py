"""Training support: only the adapter learns; the loss covers answers only; the result serves."""

from __future__ import annotations

import torch
from PIL import Image

from service.model.generate import GenerationRequest, generate
from service.model.lora import AdapterConfig, adapter_batch
from service.model.training import IGNORE_INDEX, TrainingExample, adapter_loss, build_batch, trainable_adapter

RED, BLUE = Image.new("RGB", (32, 32), (220, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 220))


def test_labels_cover_the_answer_and_eos_only(tiny_base):
    batch = build_batch(tiny_base, [TrainingExample("What colour?", "red", [RED]), TrainingExample("hi", "a b c")])
    tok = tiny_base.tokenizer
    for row, labels in zip(batch.token_rows, batch.labels, strict=True):
        answer = [t for t in labels.tolist() if t != IGNORE_INDEX]
        assert answer[-1] == tok.eos_token_id
        assert row[-len(answer) :] == answer
    assert tok.decode([t for t in batch.labels[0].tolist() if t != IGNORE_INDEX], skip_special_tokens=True).strip() == "red"


def test_only_the_trained_adapter_gets_gradients_and_slots_stay_untouched(tiny_base):
    other = tiny_base.slots.new_adapter(AdapterConfig(r=4, lora_alpha=8), seed=5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    tiny_base.slots.load(1, other)
    banks = {k: v.clone() for k, v in tiny_base.model.named_buffers() if "lora_" in k or "ln_" in k}

    adapter = trainable_adapter(tiny_base, AdapterConfig(r=4, lora_alpha=8), seed=0)
    batch = build_batch(tiny_base, [TrainingExample("What colour?", "red", [RED])])
    adapter_loss(tiny_base, batch, adapter).backward()

    assert all(p.grad is None for p in tiny_base.model.parameters())
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    for k, v in tiny_base.model.named_buffers():
        if k in banks:
            assert torch.equal(v, banks[k]), k


def _train_colours(base, steps: int):
    """A rank-8 Dual-LoRA trained ``steps`` AdamW steps to answer red / blue; returns the examples,
    their batch, the adapter and the losses."""
    # A random tiny model's lm_head (std 0.02 after a final RMSNorm) caps logits near ±1, so no
    # adapter could make any answer likely; sharpen it as training would have.
    with torch.no_grad():
        base.model.lm_head.weight.mul_(25)
    examples = [TrainingExample("What colour is it?", "red", [RED]), TrainingExample("What colour is it?", "blue", [BLUE])]
    adapter = trainable_adapter(base, AdapterConfig(peft_type="DUAL_LORA", r=8, lora_alpha=16), seed=0)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    batch = build_batch(base, examples)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = adapter_loss(base, batch, adapter)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return examples, batch, adapter, losses


def test_training_a_dual_lora_slot_teaches_the_answers(tiny_base):
    examples, batch, adapter, losses = _train_colours(tiny_base, steps=60)
    assert losses[-1] < 0.1 * losses[0]

    # The trainable path (training) and the slot banks (serving) compute the same function.
    adapter.eval()
    tiny_base.slots.load(3, adapter)
    with torch.no_grad():
        via_slot = _logits(tiny_base, batch, slots=[3, 3])
        via_trainable = _logits(tiny_base, batch, trainable=adapter)
    torch.testing.assert_close(via_slot, via_trainable, rtol=1e-4, atol=1e-4)

    answers = generate(
        tiny_base,
        [GenerationRequest(ex.instruction, ex.images, slot=s, max_new_tokens=4) for s in (3, 0) for ex in examples],
    )
    assert [a.text for a in answers[:2]] == ["red", "blue"]
    assert [a.text for a in answers[2:]] != ["red", "blue"]


def _logits(base, batch, slots=None, trainable=None):
    from service.model.generate import embed_prompts

    feats = [list(base.encode_images(base.preprocess_images(ims))) for ims in batch.images]
    embeds, mask = embed_prompts(base, batch.token_rows, feats)
    with adapter_batch(slots, trainable=trainable):
        return base.model(inputs_embeds=embeds, attention_mask=mask).logits


def test_an_adapter_trains_on_a_bfloat16_base_in_float32(tiny_base_dir):
    """The GPU default is a bfloat16 base; the trainable adapter stays float32 (the optimizer's
    master weights), so its input is cast up and its delta back down. Before that cast, the first
    forward failed with a dtype mismatch."""
    from service.model.base import load_base

    base = load_base(tiny_base_dir, dtype=torch.bfloat16, n_slots=2, max_rank=8)
    _, batch, adapter, losses = _train_colours(base, steps=30)
    assert all(p.dtype == torch.float32 and p.grad is not None for p in adapter.parameters())
    assert losses[-1] < 0.5 * losses[0]

    adapter.eval()
    base.slots.load(1, adapter)
    with torch.no_grad():
        via_slot = _logits(base, batch, slots=[1, 1]).float()
        via_trainable = _logits(base, batch, trainable=adapter).float()
    # (logits of ±30 here, where bfloat16 steps by 0.125: two steps apart at most)
    torch.testing.assert_close(via_slot, via_trainable, rtol=2e-2, atol=0.25)
