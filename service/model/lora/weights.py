"""One adapter's weights for one base linear layer, as trainable modules.

These are the reference formulas (one adapter, every row), used for training and for checking the
batched slot banks in :mod:`service.model.lora.layers`:

* LoRA:       ``delta(x) = s · B A x``
* Dual-LoRA:  ``delta(x) = s · B( ReLU(T x) ⊙ LayerNorm(A · dropout(x)) )``

``A``/``T`` are ``[r, d_in]`` (Kaiming-uniform), ``B`` is ``[d_out, r]`` (zero), so a new adapter
starts as the base model exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5


class LoRAWeights(nn.Module):
    """Plain LoRA: ``s · B A dropout(x)``."""

    kind = "LORA"

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_in]`` → delta ``[..., d_out]``."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        """PEFT-style tensor names (relative to the module path) → tensors."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}


class DualLoRAWeights(nn.Module):
    """Dual-LoRA: skill space ``A`` with LayerNorm, ReLU-rectified task space ``T``, shared ``B``."""

    kind = "DUAL_LORA"

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_T = nn.Parameter(torch.empty(r, d_in))
        self.lora_ln_weight = nn.Parameter(torch.ones(r))
        self.lora_ln_bias = nn.Parameter(torch.zeros(r))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., d_in]`` → delta ``[..., d_out]``."""
        skill = F.layer_norm(
            F.linear(self.dropout(x), self.lora_A), (self.r,), self.lora_ln_weight, self.lora_ln_bias, LN_EPS
        )
        task = F.relu(F.linear(x, self.lora_T))
        return F.linear(task * skill, self.lora_B) * self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "lora_A.weight": self.lora_A,
            "lora_T.weight": self.lora_T,
            "lora_ln.weight": self.lora_ln_weight,
            "lora_ln.bias": self.lora_ln_bias,
            "lora_B.weight": self.lora_B,
        }


WEIGHT_CLASSES: dict[str, type[LoRAWeights] | type[DualLoRAWeights]] = {
    LoRAWeights.kind: LoRAWeights,
    DualLoRAWeights.kind: DualLoRAWeights,
}


class AdapterWeights(nn.Module):
    """All layers of one adapter: ``{module path: LoRAWeights | DualLoRAWeights}``.

    Module paths are those of the base model (``model.language_model.layers.0.self_attn.q_proj``);
    ``nn.ModuleDict`` keys cannot hold dots, so they are stored with ``/`` instead.
    """

    def __init__(self, peft_type: str, layers: dict[str, LoRAWeights | DualLoRAWeights]):
        super().__init__()
        self.peft_type = peft_type
        self.layers = nn.ModuleDict({path.replace(".", "/"): module for path, module in layers.items()})

    def get(self, path: str) -> LoRAWeights | DualLoRAWeights | None:
        key = path.replace(".", "/")
        return self.layers[key] if key in self.layers else None

    def items(self) -> list[tuple[str, LoRAWeights | DualLoRAWeights]]:
        return [(key.replace("/", "."), module) for key, module in self.layers.items()]
