"""The float32 attention a half-precision base runs on a CPU, against transformers' own SDPA."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from service.model.attention import (
    SDPA_FLOAT32,
    SDPA_ROWS,
    attention_for,
    last_query_rows,
    leading_last_only_rows,
    rows_split,
    sdpa_float32_attention,
)
from service.model.base import load_base
from service.model.generate import GenerationRequest, embed_prompts, encode_prompt, generate, image_features
from tests.model.test_generate import images
from tests.model.test_packing import join_mask


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [
        ("cpu", torch.bfloat16, SDPA_FLOAT32),
        ("cpu", torch.float16, SDPA_FLOAT32),
        ("cpu", torch.float32, SDPA_ROWS),
        ("cuda", torch.bfloat16, None),
        ("cuda:0", torch.float16, None),
    ],
)
def test_which_attention(device, dtype, expected):
    assert attention_for(device, dtype) == expected


def _module(groups: int) -> nn.Module:
    module = nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = groups, True, False
    return module


@pytest.mark.parametrize("groups", [1, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("q_len", [1, 7], ids=["decode", "prefill"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_float32_attention_is_sdpa_on_upcast_inputs(groups, q_len, mask_kind):
    """bfloat16 in, bfloat16 out, and in between exactly what SDPA computes on the float32 inputs."""
    g = torch.Generator().manual_seed(0)
    b, heads, kv_len, d = 3, 4, 9, 8
    query = torch.randn(b, heads, q_len, d, generator=g).bfloat16()
    key = torch.randn(b, heads // groups, kv_len, d, generator=g).bfloat16()
    value = torch.randn(b, heads // groups, kv_len, d, generator=g).bfloat16()
    allowed = torch.ones(b, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    allowed[0, ..., :2] = False  # left padding in the first row
    mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -1e9).bfloat16()
    module = _module(groups)
    got, _ = sdpa_float32_attention(module, query, key, value, mask, scaling=d**-0.5)
    reference_mask = mask if mask_kind == "bool" else mask.float()
    want, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), reference_mask, scaling=d**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (b, q_len, heads, d)
    torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)


def test_float32_inputs_pass_straight_through():
    g = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 2, 3, 4, generator=g) for _ in range(3))
    got, _ = sdpa_float32_attention(_module(1), query, key, value, None, scaling=0.5)
    want, _ = sdpa_attention_forward(_module(1), query, key, value, None, scaling=0.5)
    assert torch.equal(got, want)


def test_a_bfloat16_base_on_cpu_runs_it_and_stays_close_to_float32(tiny_base_dir, caplog):
    """Loaded in bfloat16 on a CPU, every attention of the base (tower and LLM) uses the float32
    kernel, and the next-token logits stay within bfloat16 rounding of the float32 base's."""
    with caplog.at_level(logging.ERROR):
        full = load_base(tiny_base_dir, n_slots=0)
        half = load_base(tiny_base_dir, n_slots=0, dtype=torch.bfloat16)
    config = half.model.config
    assert {config._attn_implementation, config.text_config._attn_implementation,
            config.vision_config._attn_implementation} == {SDPA_FLOAT32}
    assert full.model.config._attn_implementation != SDPA_FLOAT32

    logits = []
    for base in (full, half):
        rows = [encode_prompt(base, "What colour is the part?", 1), encode_prompt(base, "Describe", 0)]
        features = [image_features(base, images()[:1]), []]
        embeds, mask = embed_prompts(base, rows, features)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = base.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        logits.append(out.logits[:, -1].float())
    torch.testing.assert_close(logits[1], logits[0], rtol=0.05, atol=0.05)

    request = GenerationRequest("What colour is the part?", images()[:1], max_new_tokens=4)
    assert generate(half, [request])[0].token_ids == generate(half, [request, request])[1].token_ids


@pytest.mark.parametrize(
    ("real", "expected"),
    [
        (join_mask(3, [4, 2], 4), 3),
        (join_mask(0, [4, 2], 4), 0),
        (join_mask(2, [], 3), 2),
        (torch.tensor([[0, 1], [1, 1], [0, 1]]), 1),  # only the leading ones count
        (torch.tensor([[0, 0, 1], [0, 1, 1]]), 1),
        (torch.tensor([[0, 0, 0], [0, 0, 1]]), 0),  # an empty first row is not a running one
    ],
)
def test_leading_rows_with_their_last_position_only(real, expected):
    assert leading_last_only_rows(real) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [1, 2], ids=["mha", "gqa"])
def test_split_rows_attend_as_the_whole_pass_does_where_it_is_read(dtype, groups):
    """The running rows' last queries and the newcomers' queries get what one call over the whole
    pass gives them; the running rows' padding positions get zeros (nothing reads them)."""
    g = torch.Generator().manual_seed(2)
    running, rests, length, cached, heads, d = 3, [5, 2], 5, 7, 4, 8
    real = join_mask(running, rests, length)
    batch = real.shape[0]
    keys_real = torch.cat([torch.ones(batch, cached, dtype=torch.long), real], dim=1)
    keys_real[0, :2] = 0  # left padding in a running row's cache
    allowed = keys_real[:, None, None, :].bool() & torch.ones(batch, 1, length, cached + length, dtype=torch.bool).tril(cached)
    query = torch.randn(batch, heads, length, d, generator=g).to(dtype)
    key = torch.randn(batch, heads // groups, cached + length, d, generator=g).to(dtype)
    value = torch.randn(batch, heads // groups, cached + length, d, generator=g).to(dtype)
    inner = sdpa_float32_attention if dtype == torch.bfloat16 else sdpa_attention_forward
    module = _module(groups)
    want, _ = inner(module, query, key, value, allowed, scaling=d**-0.5)
    split = rows_split(inner)
    with last_query_rows(leading_last_only_rows(real)):
        got, _ = split(module, query, key, value, allowed, scaling=d**-0.5)
    assert got.shape == want.shape == (batch, length, heads, d)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 1e-2}
    torch.testing.assert_close(got[:running, -1], want[:running, -1], **tolerance)
    torch.testing.assert_close(got[running:], want[running:], **tolerance)
    assert not got[:running, :-1].any()
    # Outside the block, with every row a newcomer, with one position or without a mask: the inner call.
    for n, q, mask in ((0, query, allowed), (batch, query, allowed), (running, query[:, :, -1:], allowed[:, :, -1:]),
                       (running, query, None)):
        with last_query_rows(n):
            got, _ = split(module, q, key, value, mask, scaling=d**-0.5)
        assert torch.equal(got, inner(module, q, key, value, mask, scaling=d**-0.5)[0])
