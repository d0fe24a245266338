"""Ablation variants: each formula against plain PyTorch, parameter counts, and the training path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from service.model.lora.variants import (
    VARIANT_CLASSES,
    DualLoRANoBoth,
    DualLoRANoLN,
    DualLoRANoReLU,
    LoRAMoE,
    parameter_count,
    variant_adapter,
)
from service.model.lora.weights import DualLoRAWeights, LoRAWeights
from service.model.training import TrainingExample, adapter_loss, build_batch

D_IN, D_OUT, R, SCALE = 12, 10, 3, 1.5


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 copy with every parameter random (B is zero at init, which would hide the formula)."""
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return module


def _reference(kind: str, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ablation formulas written out with explicit loops over rank entries / experts."""
    if kind == "LORA_MOE":
        gates = torch.softmax(x @ m.router.T, -1)
        out = torch.zeros(*x.shape[:-1], D_OUT, dtype=x.dtype)
        for e in range(m.n_experts):
            a = m.lora_A[e * R : (e + 1) * R]
            b = m.lora_B[:, e * R : (e + 1) * R]
            out += gates[..., e : e + 1] * ((x @ a.T) @ b.T)
        return SCALE * out
    skill = x @ m.lora_A.T
    task = x @ m.lora_T.T
    if kind in ("DUAL_LORA", "DUAL_LORA_NO_RELU"):
        mean = skill.mean(-1, keepdim=True)
        var = skill.var(-1, unbiased=False, keepdim=True)
        skill = (skill - mean) / torch.sqrt(var + 1e-5) * m.lora_ln_weight + m.lora_ln_bias
    if kind in ("DUAL_LORA", "DUAL_LORA_NO_LN"):
        task = torch.clamp(task, min=0)
    return SCALE * ((task * skill) @ m.lora_B.T)


@pytest.mark.parametrize("kind", ["DUAL_LORA", "DUAL_LORA_NO_LN", "DUAL_LORA_NO_RELU", "DUAL_LORA_NO_BOTH", "LORA_MOE"])
def test_variant_matches_its_formula(kind):
    m = _randomised(VARIANT_CLASSES[kind](D_IN, D_OUT, R, SCALE))
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference(kind, m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", sorted(VARIANT_CLASSES))
def test_parameter_count_and_zero_start(kind):
    m = VARIANT_CLASSES[kind](D_IN, D_OUT, R, SCALE)
    assert sum(p.numel() for p in m.parameters()) == parameter_count(kind, D_IN, D_OUT, R)
    # B starts at zero: a fresh adapter of any kind is the base model exactly.
    assert torch.count_nonzero(m(torch.randn(4, D_IN))) == 0


def test_ablations_change_what_they_claim_to():
    dual = _randomised(DualLoRAWeights(D_IN, D_OUT, R, SCALE))
    x = torch.randn(64, D_IN, dtype=torch.float64)
    for cls in (DualLoRANoLN, DualLoRANoReLU, DualLoRANoBoth):
        variant = cls(D_IN, D_OUT, R, SCALE).double()
        variant.load_state_dict({k: v for k, v in dual.state_dict().items() if k in variant.state_dict()})
        assert not torch.allclose(variant(x), dual(x))
    # Without the ReLU, the negative half of the task space contributes; with it, it cannot.
    no_relu = DualLoRANoReLU(D_IN, D_OUT, R, SCALE).double()
    no_relu.load_state_dict(dual.state_dict())
    with torch.no_grad():
        no_relu.lora_T.copy_(-dual.lora_T.abs())
        dual.lora_T.copy_(-dual.lora_T.abs())
    x_pos = x.abs()
    assert torch.count_nonzero(dual(x_pos)) == 0
    assert torch.count_nonzero(no_relu(x_pos)) > 0


def test_one_expert_moe_is_plain_lora():
    moe = _randomised(LoRAMoE(D_IN, D_OUT, R, SCALE, n_experts=1))
    lora = LoRAWeights(D_IN, D_OUT, R, SCALE).double()
    lora.load_state_dict({"lora_A": moe.lora_A, "lora_B": moe.lora_B})
    x = torch.randn(3, D_IN, dtype=torch.float64)
    torch.testing.assert_close(moe(x), lora(x))
    gates = LoRAMoE(D_IN, D_OUT, R, SCALE, n_experts=4).gates(torch.randn(5, D_IN))
    torch.testing.assert_close(gates.sum(-1), torch.ones(5))


def test_unknown_kind_is_refused(tiny_base):
    with pytest.raises(ValueError, match="unknown adapter kind"):
        variant_adapter(dict(tiny_base.slots.layers), "LOHA", 4, 8.0, seed=0)
    with pytest.raises(ValueError):
        parameter_count("LOHA", 4, 4, 1)


@pytest.mark.parametrize("kind", ["DUAL_LORA_NO_LN", "LORA_MOE"])
def test_variant_trains_through_the_adapter_context(tiny_base, kind):
    layers = dict(tiny_base.slots.layers)
    adapter = variant_adapter(layers, kind, 4, 8.0, seed=0)
    again = variant_adapter(layers, kind, 4, 8.0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(adapter.parameters(), again.parameters(), strict=True))
    batch = build_batch(tiny_base, [TrainingExample("What colour?", "red", [Image.new("RGB", (32, 32), "red")])])
    base_loss = adapter_loss(tiny_base, batch, None)
    loss = adapter_loss(tiny_base, batch, adapter)
    assert loss.item() == pytest.approx(base_loss.item(), abs=1e-6)  # zero B: exactly the base
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for _ in range(5):
        loss = adapter_loss(tiny_base, batch, adapter)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in tiny_base.model.parameters())
    assert adapter_loss(tiny_base, batch, adapter).item() < base_loss.item() - 0.1
    assert F.mse_loss(adapter.items()[0][1].lora_B, torch.zeros_like(adapter.items()[0][1].lora_B)) > 0
