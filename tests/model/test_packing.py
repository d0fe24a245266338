"""Linears over a padded pass's real tokens: the same results at the real positions as the plain
linear, and whole join passes that answer as each request alone."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from service.model import packing
from service.model.generate import GenerationRequest, RunningBatch, generate
from service.model.packing import linear_over_tokens, packed_tokens, packing_for
from service.model.prefix_cache import PrefixCache
from tests.helpers import bias_eos
from tests.model.test_generate import images, load_random_adapters

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def join_mask(running: int, joining: list[int], width: int) -> torch.Tensor:
    """A join pass's new positions: ``running`` rows with one token (the last position), then rows
    with the given numbers of tokens, right-aligned."""
    mask = torch.zeros(running + len(joining), width, dtype=torch.long)
    mask[:running, -1] = 1
    for row, n in enumerate(joining, start=running):
        mask[row, width - n :] = 1
    return mask


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_a_packed_linear_equals_the_linear_at_the_real_positions_and_is_zero_at_the_padding(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=True).to(dtype)
    mask = join_mask(6, [5, 8, 3], width=8)
    x = torch.randn(*mask.shape, 24, dtype=dtype)
    want = linear(x)
    with torch.no_grad(), packed_tokens(packing_for(mask)) as packed:
        assert packed is not None and packed.index.tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist()
        got = linear_over_tokens(linear, x)
    real = mask.bool()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got[real], want[real], rtol=tol, atol=tol)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))
    assert torch.equal(linear_over_tokens(linear, x), want)  # outside the block: the plain linear


def test_passes_where_packing_would_not_pay_are_left_as_they_are():
    assert packing_for(torch.ones(8, 6, dtype=torch.long)) is None  # no padding
    assert packing_for(join_mask(3, [6, 6], width=6)) is None  # 15 of 30 real, but under MIN_POSITIONS
    mostly_real = join_mask(0, [8, 8, 8, 7], width=8)  # 31 of 32
    assert packing_for(mostly_real) is None
    assert packing_for(join_mask(12, [8, 10], width=12)) is not None  # 30 of 168
    linear = nn.Linear(4, 4)
    x = torch.randn(3, 5, 4)
    with packed_tokens(packing_for(join_mask(30, [5], width=5))):  # another layout than x's
        assert torch.equal(linear_over_tokens(linear, x), linear(x))


def test_the_same_hidden_states_are_gathered_once_and_again_after_an_in_place_write():
    mask = join_mask(10, [4, 6], width=6)
    packed = packing_for(mask)
    x = torch.randn(12, 6, 8)
    first = packed.gather(x)
    assert packed.gather(x) is first  # the query, key and value projections share one gather
    x.mul_(2)
    again = packed.gather(x)
    assert again is not first
    torch.testing.assert_close(again, first * 2)


def test_a_packing_is_seen_only_by_the_thread_that_set_it():
    import threading

    linear = nn.Linear(4, 4)
    mask = join_mask(30, [5], width=5)
    x = torch.randn(*mask.shape, 4)
    seen = []
    with torch.no_grad(), packed_tokens(packing_for(mask)):
        thread = threading.Thread(target=lambda: seen.append(linear_over_tokens(linear, x)))
        thread.start()
        thread.join()
        assert torch.equal(seen[0], linear(x))  # the other thread ran the plain linear
        assert not torch.equal(linear_over_tokens(linear, x), linear(x))


@pytest.fixture()
def base_with_all_slots(tiny_base_dir, caplog):
    """The tiny base with slot layers on every linear of the LLM, as the server has them."""
    from service.model.base import load_base

    with caplog.at_level(logging.ERROR):
        return load_base(tiny_base_dir, n_slots=4, max_rank=8, target_modules=ALL_LINEARS)


def test_join_passes_run_their_linears_over_the_real_tokens_and_answer_as_each_request_alone(
        base_with_all_slots, monkeypatch):
    """Newcomers join running rows in a pass mostly of padding: its linears run packed (every slot
    layer of the LLM), the running rows attend with their one real query, and every row still
    answers token for token as it does alone."""
    base = base_with_all_slots
    bias_eos(base, -1e4)
    load_random_adapters(base)
    ims = images()
    packings = []
    packed_calls = []
    real_packing_for, real_scatter = packing.packing_for, packing.PackedTokens.scatter

    def recording_packing_for(real):
        packings.append(real_packing_for(real))
        return packings[-1]

    def recording_scatter(self, y):
        packed_calls.append(y.shape[0])
        return real_scatter(self, y)

    monkeypatch.setattr("service.model.generate.packing_for", recording_packing_for)
    monkeypatch.setattr(packing.PackedTokens, "scatter", recording_scatter)
    questions = ["What colour is the part?", "Where is it?", "Is it broken?", "Describe it"]
    running = [GenerationRequest(q, [im], slot=slot, max_new_tokens=6, prefix_scope=f"slot-{slot}")
               for slot, (q, im) in enumerate(zip(questions, ims * 2, strict=False))]
    running += [GenerationRequest(q, [ims[0]], slot=0, max_new_tokens=5, prefix_scope="slot-0") for q in questions]
    joiners = [GenerationRequest("How many parts are there in the picture?", [ims[1]], slot=1, max_new_tokens=4,
                                 prefix_scope="slot-1"),
               GenerationRequest("Colour?", [ims[2]], slot=3, max_new_tokens=3, prefix_scope="slot-3")]
    prefixes = PrefixCache()
    generate(base, joiners, prefixes=prefixes)  # the joiners' image prefixes are cached now
    batch = RunningBatch.prefill(base, running, keys=list(range(len(running))), prefixes=prefixes)
    got = dict(batch.step())
    packings.clear()
    packed_calls.clear()
    batch.add(joiners, keys=["j0", "j1"], prefixes=prefixes)
    rests = [len(joiner.rest) for joiner in batch.joining]
    assert len(rests) == 2
    o_proj = base.model.model.language_model.layers[0].self_attn.o_proj
    attention_out = []
    hook = o_proj.register_forward_pre_hook(lambda _module, args: attention_out.append(args[0]))
    try:
        got.update(batch.step())  # the join pass
    finally:
        hook.remove()
    # The running rows attended with their last query only: their padding positions got zeros.
    running_rows = attention_out[0][: len(running)]
    assert running_rows.shape[1] > 1 and not running_rows[:, :-1].any() and running_rows[:, -1].abs().sum() > 0
    join_packing = packings[0]
    assert join_packing is not None and join_packing.rows == len(running) + 2
    # Each running row's one token and each joiner's prompt after its prefix: under half the pass.
    assert join_packing.index.numel() == len(running) + sum(rests)
    assert join_packing.index.numel() < join_packing.rows * join_packing.length / 2
    assert packed_calls == [join_packing.index.numel()] * (len(ALL_LINEARS) * base.model.config.text_config.num_hidden_layers)
    while batch:
        got.update(batch.step())
    for key, req in zip([*range(len(running)), "j0", "j1"], running + joiners, strict=True):
        alone = generate(base, [GenerationRequest(req.instruction, req.images, slot=req.slot,
                                                  max_new_tokens=req.max_new_tokens)])[0]
        assert got[key].token_ids == alone.token_ids and len(alone.token_ids) == req.max_new_tokens, key


def test_a_join_pass_gives_the_same_logits_packed_or_not(base_with_all_slots, monkeypatch):
    """Packing changes which positions the multiplies see, not what the real ones get: the logits
    of a join pass match those of the same pass run padded."""
    base = base_with_all_slots
    bias_eos(base, -1e4)
    load_random_adapters(base)
    ims = images()
    scattered: list[int] = []
    real_scatter = packing.PackedTokens.scatter
    monkeypatch.setattr(packing.PackedTokens, "scatter", lambda self, y: (scattered.append(y.shape[0]),
                                                                         real_scatter(self, y))[1])
    running = [GenerationRequest(q, [ims[i % 3]], slot=i % 4, max_new_tokens=4, prefix_scope=f"slot-{i % 4}")
               for i, q in enumerate(["Colour?", "Where?", "What is it?", "Broken?"] * 3)]
    joiner = GenerationRequest("How many parts are there in the picture?", [ims[1]], slot=2, max_new_tokens=4,
                               prefix_scope="slot-2")
    logits = {}
    for label, fraction in (("padded", -1.0), ("packed", packing.MAX_REAL_FRACTION)):
        monkeypatch.setattr(packing, "MAX_REAL_FRACTION", fraction)
        prefixes = PrefixCache()
        generate(base, [joiner], prefixes=prefixes)
        batch = RunningBatch.prefill(base, running, prefixes=prefixes)
        batch.step()
        batch.add([joiner], keys=["j"], prefixes=prefixes)
        scattered.clear()
        batch.step()
        assert bool(scattered) == (label == "packed")
        logits[label] = batch.logits
    torch.testing.assert_close(logits["packed"], logits["padded"], rtol=1e-5, atol=1e-5)
