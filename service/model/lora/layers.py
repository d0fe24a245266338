"""A base ``nn.Linear`` with a fixed number of resident adapter slots (Punica / S-LoRA style).

Every slot holds one adapter's weights, stacked along a leading slot dimension and zero-padded to
``max_rank``. A forward reads the per-row slot ids from :mod:`service.model.lora.context` and adds
each row's own adapter delta; rows with different adapters, LoRA and Dual-LoRA mixed, run in the
same pass. Slot 0 is "no adapter" and is never computed.

Slot banks are non-persistent buffers: they follow ``.to(device)`` but never enter the base
model's ``state_dict``, and they carry no gradients (training uses
:class:`~service.model.lora.weights.AdapterWeights` through the context instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.model.lora.context import current_batch
from service.model.lora.weights import LN_EPS, DualLoRAWeights, LoRAWeights

KIND_NONE, KIND_LORA, KIND_DUAL = 0, 1, 2
KIND_OF = {LoRAWeights.kind: KIND_LORA, DualLoRAWeights.kind: KIND_DUAL}


def _dual_rows(layer: SlotLinear, width: int) -> torch.Tensor | slice:
    """Rows of ``lora_AT`` a Dual-LoRA kernel of rank width ``width`` reads: ``A[:width]`` and ``T[:width]``."""
    if width == layer.max_rank:
        return slice(None)
    rows = layer._dual_rows.get(width)
    if rows is None:
        rank = layer.max_rank
        rows = torch.cat([torch.arange(width), torch.arange(rank, rank + width)]).to(layer.lora_AT.device)
        layer._dual_rows[width] = rows
    return rows


class LoRAKernel:
    """Batched ``s · B A x`` for rows whose slots hold plain LoRA adapters."""

    kind = KIND_LORA

    @staticmethod
    def delta(layer: SlotLinear, x: torch.Tensor, slots: torch.Tensor, same: int | None, width: int,
              full: bool) -> torch.Tensor:
        """``x``: ``[n, L, d_in]``, ``slots``: ``[n]`` → ``[n, L, d_out]``.

        Only the first ``width`` rank entries are read (the largest rank among the rows): the slot
        banks are zero-padded to ``max_rank``, so the rest would add zeros.
        """
        if same is not None:
            hidden = F.linear(x, layer.lora_AT[same, :width])
            return F.linear(hidden, layer.lora_B[same, :, :width]) * layer.scale[same]
        hidden = torch.bmm(x, layer.lora_AT[slots, :width].transpose(1, 2))
        out = torch.bmm(hidden, layer.lora_B[slots, :, :width].transpose(1, 2))
        return out * layer.scale[slots].view(-1, 1, 1)


class DualLoRAKernel:
    """Batched ``s · B(ReLU(T x) ⊙ LN(A x))``; ``A`` and ``T`` are applied in one matmul."""

    kind = KIND_DUAL

    @staticmethod
    def _gate(layer: SlotLinear, hidden: torch.Tensor, slots: torch.Tensor | int, width: int, full: bool) -> torch.Tensor:
        """``hidden``: ``[..., 2w]`` = [A x | T x] → ``ReLU(T x) ⊙ LN(A x)``: ``[..., w]``.

        ``full``: every row's rank is ``width``, so LayerNorm runs over all ``w`` entries.
        """
        skill, task = hidden[..., :width], hidden[..., width:]
        weight, bias = layer.ln_weight[slots, :width], layer.ln_bias[slots, :width]
        if isinstance(slots, torch.Tensor):
            weight, bias = weight.unsqueeze(1), bias.unsqueeze(1)
        if full:
            normed = F.layer_norm(skill, (width,), eps=LN_EPS)
        else:
            # LayerNorm over each adapter's own r entries; the zero padding stays out of the stats.
            ranks = layer.rank[slots]
            r = ranks.to(skill.dtype)
            mask = torch.arange(width, device=skill.device) < ranks.unsqueeze(-1)
            if isinstance(slots, torch.Tensor):
                r, mask = r.view(-1, 1, 1), mask.unsqueeze(1)
            mask = mask.to(skill.dtype)
            mean = (skill * mask).sum(-1, keepdim=True) / r
            var = (((skill - mean) * mask) ** 2).sum(-1, keepdim=True) / r
            normed = (skill - mean) * torch.rsqrt(var + LN_EPS) * mask
        return F.relu(task) * (normed * weight + bias)

    @classmethod
    def delta(cls, layer: SlotLinear, x: torch.Tensor, slots: torch.Tensor, same: int | None, width: int,
              full: bool) -> torch.Tensor:
        """``x``: ``[n, L, d_in]``, ``slots``: ``[n]`` → ``[n, L, d_out]``; rank entries as in LoRA."""
        rows = _dual_rows(layer, width)
        if same is not None:
            gated = cls._gate(layer, F.linear(x, layer.lora_AT[same, rows]), same, width, full)
            return F.linear(gated, layer.lora_B[same, :, :width]) * layer.scale[same]
        at = layer.lora_AT[slots] if isinstance(rows, slice) else layer.lora_AT[slots.unsqueeze(1), rows]
        hidden = torch.bmm(x, at.transpose(1, 2))
        gated = cls._gate(layer, hidden, slots, width, full)
        out = torch.bmm(gated, layer.lora_B[slots, :, :width].transpose(1, 2))
        return out * layer.scale[slots].view(-1, 1, 1)


KERNELS = (LoRAKernel, DualLoRAKernel)


class SlotLinear(nn.Module):
    """``y = W x + delta_{slot(row)}(x)`` with ``n_slots`` resident adapters (+ slot 0 = none).

    Banks (``S = n_slots + 1``, ``R = max_rank``):
    ``lora_AT [S, 2R, d_in]`` (A rows then T rows), ``lora_B [S, d_out, R]``,
    ``ln_weight/ln_bias [S, R]``, ``scale [S]``, ``rank [S]``, ``kind [S]``.
    """

    def __init__(self, base: nn.Linear, path: str, n_slots: int, max_rank: int):
        super().__init__()
        self.base = base
        self.path = path
        self.n_slots, self.max_rank = n_slots, max_rank
        d_in, d_out = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        slots = n_slots + 1
        self.register_buffer("lora_AT", torch.zeros(slots, 2 * max_rank, d_in, **factory), persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, d_out, max_rank, **factory), persistent=False)
        self.register_buffer("ln_weight", torch.ones(slots, max_rank, **factory), persistent=False)
        self.register_buffer("ln_bias", torch.zeros(slots, max_rank, **factory), persistent=False)
        self.register_buffer("scale", torch.zeros(slots, **factory), persistent=False)
        self.register_buffer("rank", torch.zeros(slots, dtype=torch.long, device=base.weight.device), persistent=False)
        self.register_buffer("kind", torch.zeros(slots, dtype=torch.long, device=base.weight.device), persistent=False)
        # Host-side copies of ``kind`` and ``rank``: the forward never syncs with the device.
        self._kinds = [KIND_NONE] * slots
        self._ranks = [0] * slots
        self._dual_rows: dict[int, torch.Tensor] = {}  # per rank width: the A and T rows it reads

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    # -- slot management -------------------------------------------------------------------
    @torch.no_grad()
    def load_slot(self, slot: int, weights: LoRAWeights | DualLoRAWeights | None) -> None:
        """Copy one adapter's weights for this layer into ``slot`` (None clears it)."""
        self._check_slot(slot)
        self.clear_slot(slot)
        if weights is None:
            return
        r = weights.r
        if r > self.max_rank:
            raise ValueError(f"{self.path}: adapter rank {r} exceeds the slot rank {self.max_rank}")
        if weights.lora_A.shape[1] != self.in_features or weights.lora_B.shape[0] != self.out_features:
            raise ValueError(f"{self.path}: adapter shapes do not match the base layer")
        R = self.max_rank
        self.lora_AT[slot, :r] = weights.lora_A.to(self.lora_AT)
        if isinstance(weights, DualLoRAWeights):
            self.lora_AT[slot, R : R + r] = weights.lora_T.to(self.lora_AT)
            self.ln_weight[slot, :r] = weights.lora_ln_weight.to(self.ln_weight)
            self.ln_bias[slot, :r] = weights.lora_ln_bias.to(self.ln_bias)
        self.lora_B[slot, :, :r] = weights.lora_B.to(self.lora_B)
        self.scale[slot] = weights.scale
        self.rank[slot] = r
        self.kind[slot] = KIND_OF[weights.kind]
        self._kinds[slot] = KIND_OF[weights.kind]
        self._ranks[slot] = r

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.lora_AT[slot].zero_()
        self.lora_B[slot].zero_()
        self.ln_weight[slot].fill_(1.0)
        self.ln_bias[slot].zero_()
        self.scale[slot] = 0.0
        self.rank[slot] = 0
        self.kind[slot] = KIND_NONE
        self._kinds[slot] = KIND_NONE
        self._ranks[slot] = 0

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.n_slots:
            raise IndexError(f"slot {slot} out of range 1..{self.n_slots}")

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # Keep the host-side kind list in sync when buffers are moved or cast.
        out = super()._apply(fn, recurse)
        self._dual_rows = {}
        self._kinds = [int(k) for k in self.kind.tolist()]
        self._ranks = [int(r) for r in self.rank.tolist()]
        return out

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, L, d_in]`` (or ``[B, d_in]``) → ``[B, L, d_out]``."""
        y = self.base(x)
        batch = current_batch()
        if batch is None:
            return y
        if batch.trainable is not None:
            weights = batch.trainable.get(self.path)
            return y if weights is None else y + weights(x).to(y.dtype)
        if batch.slot_ids is None or batch.all_same_slot == 0:
            return y
        squeeze = x.dim() == 2
        if squeeze:
            x, y = x.unsqueeze(1), y.unsqueeze(1)
        if x.shape[0] != batch.slot_ids.shape[0]:
            raise ValueError(f"{self.path}: batch has {x.shape[0]} rows but {batch.slot_ids.shape[0]} slot ids")
        same = batch.all_same_slot
        if same is not None:
            kernel = KERNELS[self._kinds[same] - 1] if self._kinds[same] else None
            if kernel is not None:
                width = self._ranks[same]
                y = y + kernel.delta(self, x, batch.slot_ids, same, width, True).to(y.dtype)
        else:
            y = self._mixed(x, y, batch.slot_ids, batch.ids)
        return y.squeeze(1) if squeeze else y

    def _mixed(self, x: torch.Tensor, y: torch.Tensor, slot_ids: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
        """Rows on different slots: each kernel handles the rows whose slot holds its kind."""
        kinds = [self._kinds[i] for i in ids]
        present = set(kinds) - {KIND_NONE}
        if not present:
            return y
        slots = slot_ids.to(x.device)
        for kernel in KERNELS:
            if kernel.kind not in present:
                continue
            mine = [i for i, k in enumerate(kinds) if k == kernel.kind]
            ranks = {self._ranks[ids[i]] for i in mine}
            width = max(ranks)  # the rank entries any of these rows uses
            full = len(ranks) == 1
            if len(mine) == len(ids):
                y = y + kernel.delta(self, x, slots, None, width, full).to(y.dtype)
                continue
            rows = torch.tensor(mine, device=x.device)
            delta = kernel.delta(self, x.index_select(0, rows), slots.index_select(0, rows), None, width, full)
            y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"path={self.path}, n_slots={self.n_slots}, max_rank={self.max_rank}"
