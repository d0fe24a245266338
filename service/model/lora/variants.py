"""Adapter variants for the ablation study (``bench/ablation.py``): trainable, not servable.

Each class is one layer's delta module with the interface of
:class:`~service.model.lora.weights.LoRAWeights` (``forward(x) -> delta``, ``r``, ``scale``), so it
plugs into training through :class:`AdapterWeights` and the trainable-adapter context unchanged.
The serving slots (:mod:`service.model.lora.layers`) only hold LoRA and Dual-LoRA; these exist to
measure which parts of Dual-LoRA matter and how it compares with a LoRA mixture of experts.

* ``DUAL_LORA_NO_LN``:   ``s · B( ReLU(T x) ⊙ A x )``
* ``DUAL_LORA_NO_RELU``: ``s · B( T x ⊙ LayerNorm(A x) )``
* ``DUAL_LORA_NO_BOTH``: ``s · B( T x ⊙ A x )``
* ``LORA_MOE``:          ``s · Σ_e softmax(G x)_e · B_e A_e x`` (dense token-level routing over
  ``n_experts`` rank-``r`` experts, as in MoLoRA / LoRA-MoE)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from service.model.lora.weights import LN_EPS, WEIGHT_CLASSES, AdapterWeights, DualLoRAWeights, LoRAWeights


class DualLoRANoLN(DualLoRAWeights):
    """Dual-LoRA with the skill-space LayerNorm removed (its affine parameters are dropped too)."""

    kind = "DUAL_LORA_NO_LN"

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__(d_in, d_out, r, scale, dropout)
        del self.lora_ln_weight, self.lora_ln_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_in]`` → delta ``[..., d_out]``."""
        skill = F.linear(self.dropout(x), self.lora_A)
        task = F.relu(F.linear(x, self.lora_T))
        return F.linear(task * skill, self.lora_B) * self.scale


class DualLoRANoReLU(DualLoRAWeights):
    """Dual-LoRA with the task space left unrectified (``T x`` instead of ``ReLU(T x)``)."""

    kind = "DUAL_LORA_NO_RELU"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skill = F.layer_norm(
            F.linear(self.dropout(x), self.lora_A), (self.r,), self.lora_ln_weight, self.lora_ln_bias, LN_EPS
        )
        return F.linear(F.linear(x, self.lora_T) * skill, self.lora_B) * self.scale


class DualLoRANoBoth(DualLoRANoLN):
    """Dual-LoRA with neither LayerNorm nor ReLU: a plain bilinear gate ``T x ⊙ A x``."""

    kind = "DUAL_LORA_NO_BOTH"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skill = F.linear(self.dropout(x), self.lora_A)
        return F.linear(F.linear(x, self.lora_T) * skill, self.lora_B) * self.scale


class LoRAMoE(nn.Module):
    """``n_experts`` LoRA experts of rank ``r`` mixed per token by a softmax router.

    ``lora_A [E·r, d_in]`` stacks the experts' down-projections, ``lora_B [d_out, E·r]`` their
    up-projections (zero, so a new adapter starts as the base), ``router [E, d_in]`` (zero: uniform
    gates at the start). Trainable parameters: ``E·r·(d_in + d_out) + E·d_in``.
    """

    kind = "LORA_MOE"

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0, n_experts: int = 4):
        super().__init__()
        self.r, self.scale, self.n_experts = r, scale, n_experts
        self.lora_A = nn.Parameter(torch.empty(n_experts * r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, n_experts * r))
        self.router = nn.Parameter(torch.zeros(n_experts, d_in))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for e in range(n_experts):  # each expert initialised like its own LoRA A
            nn.init.kaiming_uniform_(self.lora_A.data[e * r : (e + 1) * r], a=math.sqrt(5))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_in]`` → routing weights ``[..., E]`` (sum to one per token)."""
        return F.linear(x, self.router).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_in]`` → delta ``[..., d_out]``."""
        hidden = F.linear(self.dropout(x), self.lora_A)  # [..., E·r]
        gated = hidden.unflatten(-1, (self.n_experts, self.r)) * self.gates(x).unsqueeze(-1)
        return F.linear(gated.flatten(-2), self.lora_B) * self.scale


VARIANT_CLASSES: dict[str, type[nn.Module]] = {
    **WEIGHT_CLASSES,
    DualLoRANoLN.kind: DualLoRANoLN,
    DualLoRANoReLU.kind: DualLoRANoReLU,
    DualLoRANoBoth.kind: DualLoRANoBoth,
    LoRAMoE.kind: LoRAMoE,
}
"""Every adapter kind the ablation can train: the two servable ones plus the variants above."""


def variant_adapter(
    layers: dict[str, nn.Linear | nn.Module],
    kind: str,
    r: int,
    alpha: float,
    seed: int,
    n_experts: int = 4,
) -> AdapterWeights:
    """A fresh trainable adapter of ``kind`` on the given base linears (``{module path: layer}``).

    ``scale = alpha / r`` for every kind (per expert for ``LORA_MOE``); parameters are float32 on
    each layer's device. The global RNG state is restored afterwards.
    """
    if kind not in VARIANT_CLASSES:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {sorted(VARIANT_CLASSES)}")
    cls = VARIANT_CLASSES[kind]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        modules: dict[str, nn.Module] = {}
        for path, layer in layers.items():
            extra = {"n_experts": n_experts} if cls is LoRAMoE else {}
            module = cls(layer.in_features, layer.out_features, r, alpha / r, **extra)
            modules[path] = module.to(device=layer.weight.device, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    adapter = AdapterWeights(kind, modules)  # type: ignore[arg-type]
    adapter.requires_grad_(True)
    return adapter


def parameter_count(kind: str, d_in: int, d_out: int, r: int, n_experts: int = 4) -> int:
    """Trainable parameters of one layer's adapter of ``kind`` (checked against the modules in tests)."""
    if kind == LoRAWeights.kind:
        return r * (d_in + d_out)
    if kind in (DualLoRAWeights.kind, DualLoRANoReLU.kind):
        return r * (2 * d_in + d_out) + 2 * r
    if kind in (DualLoRANoLN.kind, DualLoRANoBoth.kind):
        return r * (2 * d_in + d_out)
    if kind == LoRAMoE.kind:
        return n_experts * r * (d_in + d_out) + n_experts * d_in
    raise ValueError(f"unknown adapter kind {kind!r}")
