"""The serving forward pass against transformers' own: the same logits and the same cache, pass by pass."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import service.model.generate as generation
from service.model.attention import last_query_rows, leading_last_only_rows
from service.model.base import load_base
from service.model.generate import GenerationRequest, generate, left_padded_positions
from service.model.kv_cache import ReservedCache
from service.model.lora import adapter_batch
from service.model.packing import packed_tokens, packing_for
from service.model.serving_forward import ServingForward, causal_padding_mask, serving_forward, unsupported_reason
from tests.helpers import bias_eos
from tests.model.test_generate import images, load_random_adapters
from tests.model.test_packing import ALL_LINEARS


@pytest.fixture(params=["float32", "bfloat16"])
def base(request, tiny_base_dir, caplog):
    """The tiny base (grouped-query attention: 4 heads over 2 key/value heads) with slot layers on
    every linear, three adapters loaded and RMSNorm weights of its own in each norm, in each dtype
    the server runs on a CPU."""
    with caplog.at_level(logging.ERROR):
        loaded = load_base(tiny_base_dir, dtype=getattr(torch, request.param), n_slots=4, max_rank=8,
                           target_modules=ALL_LINEARS)
    load_random_adapters(loaded)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # (a random base's norms are all ones: make each layer's its own)
        for name, parameter in loaded.model.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    return loaded


def passes(base, rows: int = 8) -> list[dict]:
    """Rows' life in the engine, as the inputs of four passes over one cache: a left-padded prefill
    from embeddings, a decode step, a join-like pass of 5 positions (the first half of the rows one
    real token in the last position, the others prompts of 5, 4, 3, ... tokens, right-aligned),
    another decode step."""
    generator = torch.Generator().manual_seed(0)
    d, vocab = base.model.config.text_config.hidden_size, base.model.config.text_config.vocab_size
    prompt = torch.ones(rows, 7, dtype=torch.long)
    for row in range(rows):
        prompt[row, : row % 4] = 0  # left-padded by 0-3 positions
    embeds = torch.randn(rows, 7, d, generator=generator).to(base.dtype)
    mask = prompt
    steps = [dict(inputs_embeds=embeds, attention_mask=mask, position_ids=left_padded_positions(mask))]
    join = torch.zeros(rows, 5, dtype=torch.long)
    join[: rows // 2, -1] = 1
    for row in range(rows // 2, rows):
        join[row, row - rows // 2 :] = 1
    for new in (torch.ones(rows, 1, dtype=torch.long), join, torch.ones(rows, 1, dtype=torch.long)):
        mask = torch.cat([mask, new], dim=1)
        ids = torch.randint(5, vocab, new.shape, generator=generator)
        steps.append(dict(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask)[:, -new.shape[1]:]))
    return steps


def run(base, forward, steps: list[dict], slots: torch.Tensor) -> tuple[list[torch.Tensor], ReservedCache]:
    """``steps`` through ``forward`` (transformers' or the serving one) over one cache, in the engine's
    contexts: per-row slots, packed linears and split attention where the pass has padding."""
    cache = ReservedCache(base.model.config)
    logits = []
    for inputs in steps:
        new = inputs.get("input_ids", inputs.get("inputs_embeds"))
        real = inputs["attention_mask"][:, -new.shape[1] :] if new.shape[1] > 1 else None
        with torch.no_grad(), adapter_batch(slots), packed_tokens(None if real is None else packing_for(real)), \
                last_query_rows(0 if real is None else leading_last_only_rows(real)):
            logits.append(forward(cache=cache, **inputs).logits)
    return logits, cache


def test_every_pass_gives_what_transformers_gives(base):
    """Prefill, decode and a join-like pass with packing, split attention and four kinds of rows:
    the same logits at every position and the same keys and values in the cache, bit for bit (the
    same operators in the same order), in float32 and bfloat16."""
    steps = passes(base)
    slots = torch.tensor([0, 1, 2, 3] * 2)  # none, Dual-LoRA, Dual-LoRA of another rank, LoRA
    assert leading_last_only_rows(steps[2]["attention_mask"][:, -5:]) == 4  # and its first rows attend split
    assert packing_for(steps[2]["attention_mask"][:, -5:]) is not None  # the join pass runs packed
    expected, expected_cache = run(base, lambda **inputs: base.model(use_cache=True, **inputs), steps, slots)
    got, got_cache = run(base, ServingForward(base.model), steps, slots)
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have.dtype == want.dtype and have.shape == want.shape, step
        torch.testing.assert_close(have, want, rtol=0, atol=0, msg=f"pass {step}")
    for want, have in zip(expected_cache.layers, got_cache.layers, strict=True):
        torch.testing.assert_close(have.keys, want.keys, rtol=0, atol=0)
        torch.testing.assert_close(have.values, want.values, rtol=0, atol=0)


def test_last_only_is_the_last_position_of_the_full_pass(base):
    steps = passes(base)[:1]
    slots = torch.tensor([0, 1, 2, 3] * 2)
    forward = ServingForward(base.model)
    full, _ = run(base, forward, steps, slots)
    last, _ = run(base, lambda **inputs: forward(last_only=True, **inputs), steps, slots)
    assert last[0].shape == (8, 1, full[0].shape[-1])
    torch.testing.assert_close(last[0], full[0][:, -1:], rtol=0, atol=0)


def test_without_positions_or_cache_it_counts_on_as_transformers_does(tiny_base):
    ids = torch.randint(5, tiny_base.model.config.text_config.vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = tiny_base.model(input_ids=ids, attention_mask=mask, use_cache=True)
        got = ServingForward(tiny_base.model)(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert got.cache.get_seq_length() == 6


def test_exactly_one_kind_of_input(tiny_base):
    forward = ServingForward(tiny_base.model)
    with pytest.raises(ValueError, match="exactly one"):
        forward(attention_mask=torch.ones(1, 2, dtype=torch.long))


# (rows' padding as [left pads] per row, new positions, cached positions)
MASK_CASES = [
    ([0, 0], 1, 9),  # decode, no padding: SDPA's flag
    ([0, 3], 1, 9),  # decode with padding
    ([0, 0], 6, 0),  # prefill, no padding: SDPA's causal flag
    ([0, 2, 4], 6, 0),  # left-padded prefill
    ([0, 0], 4, 5),  # several new positions after a cache, no padding
    ([1, 0, 6], 4, 5),  # ... with padding in the cache and among the new positions
]


@pytest.mark.parametrize(("pads", "q_length", "past"), MASK_CASES)
def test_the_mask_is_the_one_transformers_builds(tiny_base, pads, q_length, past):
    """:func:`causal_padding_mask` against transformers' ``create_causal_mask`` (the mask the
    reference forward uses), None where that is None."""
    kv_length = past + q_length
    attention_mask = torch.ones(len(pads), kv_length, dtype=torch.long)
    for row, pad in enumerate(pads):
        attention_mask[row, :pad] = 0
    config = tiny_base.model.config.text_config
    cache = ReservedCache(tiny_base.model.config)
    if past:
        shape = (len(pads), config.num_key_value_heads, past, config.hidden_size // config.num_attention_heads)
        for layer in range(config.num_hidden_layers):
            cache.update(torch.zeros(shape), torch.zeros(shape), layer)
    embeds = torch.zeros(len(pads), q_length, config.hidden_size)
    want = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                              position_ids=None)
    got = causal_padding_mask(attention_mask, q_length, past)
    if want is None:
        assert got is None
    else:
        assert got is not None and got.dtype == torch.bool
        assert torch.equal(got, want.expand_as(got))


def test_it_stands_in_only_where_it_computes_what_transformers_does(tiny_base):
    model = tiny_base.model
    with torch.no_grad():
        assert unsupported_reason(model) is None
        assert serving_forward(model) is serving_forward(model)  # made once
    assert "autograd" in unsupported_reason(model)  # (the tests run with gradients on)
    assert serving_forward(model) is None
    with torch.no_grad():
        model.train()
        try:
            assert "training" in unsupported_reason(model)
        finally:
            model.eval()
        model.set_attn_implementation("eager")
        try:
            assert "eager" in unsupported_reason(model)
        finally:
            model.set_attn_implementation("sdpa_rows")
        assert "only LlamaModel" in unsupported_reason(SimpleNamespace(model=SimpleNamespace(language_model=object())))


def test_generation_answers_the_same_through_either_forward(tiny_base, monkeypatch):
    """Batched generation with mixed adapters, through the serving forward and through transformers'
    (what a base it does not apply to runs): the same tokens."""
    bias_eos(tiny_base, -1e4)  # every row runs to its max_new_tokens
    load_random_adapters(tiny_base)
    ims = images()
    requests = [GenerationRequest("What colour is the part?", [ims[0]], slot=1, max_new_tokens=5),
                GenerationRequest("Describe", [], slot=0, max_new_tokens=3),
                GenerationRequest("Where is it?", [ims[1], ims[2]], slot=3, max_new_tokens=4, temperature=0.8, seed=3)]
    used = []
    real = generation.serving_forward

    def recording(model):
        used.append(real(model))
        return used[-1]

    monkeypatch.setattr(generation, "serving_forward", recording)
    served = [r.token_ids for r in generate(tiny_base, requests)]
    assert used and all(forward is not None for forward in used)
    monkeypatch.setattr(generation, "serving_forward", lambda model: None)
    assert [r.token_ids for r in generate(tiny_base, requests)] == served
