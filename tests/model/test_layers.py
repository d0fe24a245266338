"""SlotLinear against the one-adapter reference formulas, per kind and dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.model.lora import DualLoRAWeights, LoRAWeights, SlotLinear, adapter_batch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
KINDS = {"LORA": LoRAWeights, "DUAL_LORA": DualLoRAWeights}


def make_weights(kind: str, d_in: int, d_out: int, r: int, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    w = KINDS[kind](d_in, d_out, r, scale=2.0 / r)
    with torch.no_grad():
        w.lora_B.normal_(std=0.1)
        if kind == "DUAL_LORA":
            w.lora_ln_weight.normal_(1.0, 0.1)
            w.lora_ln_bias.normal_(0.0, 0.1)
    return w.to(dtype)


def make_layer(dtype=torch.float32, d_in=24, d_out=20, n_slots=4, max_rank=8):
    torch.manual_seed(123)
    base = nn.Linear(d_in, d_out).to(dtype)
    return SlotLinear(base, "layers.0.self_attn.q_proj", n_slots, max_rank)


def close(a, b, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["LORA", "DUAL_LORA"])
@pytest.mark.parametrize("rank", [8, 5])  # 5 < max_rank: padded slot, masked LayerNorm
def test_one_adapter_matches_reference(kind, dtype, rank):
    layer = make_layer(dtype)
    weights = make_weights(kind, 24, 20, rank, seed=1, dtype=dtype)
    layer.load_slot(2, weights)
    x = torch.randn(3, 7, 24, dtype=dtype)
    with adapter_batch([2, 2, 2]):
        got = layer(x)
    want = layer.base(x) + weights(x)
    close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "ranks",
    [(8, 4, 6), (5, 3, 2), (4, 4, 4)],
    ids=["one-at-max-rank", "all-below-max-rank", "equal-ranks-below-max"],
)
@pytest.mark.parametrize(
    ("slots", "tokens"),
    [([0, 1, 2, 3, 1, 0], 5), ([0, 1, 2, 3, 1, 0], 1), ([0, 2, 1, 0], 1), ([2, 1, 3], 1)],
    ids=["both-kinds-prompt", "both-kinds-decode", "dual-and-base-decode", "no-base-decode"],
)
def test_mixed_batch_equals_each_row_alone(dtype, ranks, slots, tokens):
    """Rows on different slots; the kernels read only the rank entries in use (the largest rank
    among their rows), with LayerNorm masked to each adapter's own rank where ranks differ. In a
    decode step (one token per row) rows without an adapter go through the first kernel on their
    all-zero slot: their output must still be the base's, exactly."""
    layer = make_layer(dtype)
    adapters = {
        1: make_weights("DUAL_LORA", 24, 20, ranks[0], seed=1, dtype=dtype),
        2: make_weights("DUAL_LORA", 24, 20, ranks[1], seed=2, dtype=dtype),
        3: make_weights("LORA", 24, 20, ranks[2], seed=3, dtype=dtype),
    }
    for slot, w in adapters.items():
        layer.load_slot(slot, w)
    x = torch.randn(len(slots), tokens, 24, dtype=dtype)
    with adapter_batch(slots):
        mixed = layer(x)
    base_rows = [row for row, slot in enumerate(slots) if slot == 0]
    assert torch.equal(mixed[base_rows], layer.base(x)[base_rows])
    for row, slot in enumerate(slots):
        with adapter_batch([slot]):
            alone = layer(x[row : row + 1])
        want = layer.base(x[row : row + 1]) + (adapters[slot](x[row : row + 1]) if slot else 0)
        close(mixed[row : row + 1], alone, dtype)
        close(alone, want, dtype)


def test_layers_with_different_slot_contents_share_one_forward():
    """Two layers in one forward whose slots hold other kinds and ranks (an adapter that targets
    only some modules): each adds its own rows' deltas."""
    first, second = make_layer(), make_layer()
    a = {1: make_weights("DUAL_LORA", 24, 20, 8, seed=1), 2: make_weights("LORA", 24, 20, 8, seed=2)}
    b = {2: make_weights("DUAL_LORA", 24, 20, 5, seed=3), 3: make_weights("LORA", 24, 20, 8, seed=4)}
    for slot, w in a.items():
        first.load_slot(slot, w)
    for slot, w in b.items():
        second.load_slot(slot, w)
    slots = [1, 2, 3, 0, 2, 1]
    x = torch.randn(len(slots), 3, 24)
    with adapter_batch(slots):
        got = [first(x), second(x), first(x)]
    for layer, adapters, out in ((first, a, got[0]), (second, b, got[1]), (first, a, got[2])):
        for row, slot in enumerate(slots):
            want = layer.base(x[row]) + (adapters[slot](x[row]) if slot in adapters else 0)
            close(out[row], want, torch.float32)


@pytest.mark.parametrize("kind", ["LORA", "DUAL_LORA"])
def test_zero_b_adapter_equals_base_exactly(kind):
    layer = make_layer(torch.float32)
    weights = make_weights(kind, 24, 20, 8, seed=1)
    with torch.no_grad():
        weights.lora_B.zero_()
    layer.load_slot(1, weights)
    x = torch.randn(4, 3, 24)
    base = layer.base(x)
    with adapter_batch([1, 1, 0, 1]):
        out = layer(x)
    assert torch.equal(out, base)


def test_loading_and_freeing_a_slot_leaves_other_rows_and_the_base_untouched():
    layer = make_layer(torch.float32)
    layer.load_slot(1, make_weights("DUAL_LORA", 24, 20, 8, seed=1))
    layer.load_slot(3, make_weights("LORA", 24, 20, 8, seed=3))
    base_weight = layer.base.weight.clone()
    x = torch.randn(3, 4, 24)
    with adapter_batch([1, 0, 3]):
        before = layer(x)
    layer.load_slot(2, make_weights("DUAL_LORA", 24, 20, 8, seed=2))
    with adapter_batch([1, 0, 3]):
        during = layer(x)
    layer.clear_slot(2)
    layer.load_slot(2, make_weights("LORA", 24, 20, 2, seed=4))
    layer.clear_slot(2)
    with adapter_batch([1, 0, 3]):
        after = layer(x)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert torch.equal(base_weight, layer.base.weight)


def test_freed_slot_is_the_base_again():
    layer = make_layer(torch.float32)
    layer.load_slot(1, make_weights("DUAL_LORA", 24, 20, 8, seed=1))
    layer.clear_slot(1)
    x = torch.randn(2, 3, 24)
    with adapter_batch([1, 1]):
        assert torch.equal(layer(x), layer.base(x))


def test_no_context_means_base_and_two_dim_inputs_work():
    layer = make_layer(torch.float32)
    weights = make_weights("LORA", 24, 20, 8, seed=1)
    layer.load_slot(1, weights)
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), layer.base(x))
    with adapter_batch([1, 0, 1]):
        out = layer(x)
    close(out[0], layer.base(x[0]) + weights(x[0]), torch.float32)
    close(out[1], layer.base(x[1]), torch.float32)


def test_bad_slot_and_shape_are_refused():
    layer = make_layer(torch.float32)
    with pytest.raises(IndexError):
        layer.load_slot(0, make_weights("LORA", 24, 20, 8, seed=1))
    with pytest.raises(IndexError):
        layer.load_slot(5, make_weights("LORA", 24, 20, 8, seed=1))
    with pytest.raises(ValueError, match="rank"):
        layer.load_slot(1, make_weights("LORA", 24, 20, 16, seed=1))
    with pytest.raises(ValueError, match="shapes"):
        layer.load_slot(1, make_weights("LORA", 12, 20, 8, seed=1))


def test_slot_banks_stay_out_of_the_state_dict_and_carry_no_gradients():
    layer = make_layer(torch.float32)
    assert set(layer.state_dict()) == {"base.weight", "base.bias"}
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("kind", ["LORA", "DUAL_LORA"])
def test_a_slot_reloaded_after_a_forward_serves_its_new_weights(kind):
    """The per-width banks cut at a forward are cut again when a slot's contents change."""
    layer = make_layer()
    first, second = (make_weights(kind, 24, 20, 4, seed=seed) for seed in (1, 2))
    x = torch.randn(2, 3, 24)
    for weights in (first, second):
        layer.load_slot(1, weights)
        for slots in ([1, 1], [1, 0]):  # one slot (views of the banks) and mixed (gathers)
            with adapter_batch(slots):
                got = layer(x)
            close(got[:1], layer.base(x[:1]) + weights(x[:1]), torch.float32)
    layer.clear_slot(1)
    with adapter_batch([1, 0]):
        assert torch.equal(layer(x), layer.base(x))
