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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.model.lora.context import current_batch
from service.model.lora.weights import LN_EPS, DualLoRAWeights, LoRAWeights
from service.model.packing import linear_over_tokens

KIND_NONE, KIND_LORA, KIND_DUAL = 0, 1, 2
KIND_OF = {LoRAWeights.kind: KIND_LORA, DualLoRAWeights.kind: KIND_DUAL}


@dataclass(frozen=True)
class SlotBanks:
    """Every slot's weights cut to the first ``width`` rank entries, contiguous (``S`` slots).

    ``at [S, w, d_in]`` (LoRA: A) or ``[S, 2w, d_in]`` (Dual-LoRA: A then T), ``b [S, d_out, w]``
    (B, multiplied by the scale), ``ln [S, 2, w]`` (Dual-LoRA: LayerNorm weight and bias). A mixed
    batch gathers each row's weights with one ``index_select`` per bank (4× faster than indexing
    with the slot tensor, ``bank[slots]``, at 16 rows: 15 against 65 µs for A and B of a rank-16
    layer in float32 on a 2-core CPU), and a batch on one slot reads views.
    """

    at: torch.Tensor
    b: torch.Tensor
    ln: torch.Tensor


def _banks(layer: SlotLinear, kind: int, width: int) -> SlotBanks:
    """The layer's :class:`SlotBanks` for ``kind`` at ``width``, cut once and kept until a slot changes."""
    banks = layer._banks.get((kind, width))
    if banks is None:
        R = layer.max_rank
        at = layer.lora_AT[:, :width] if kind == KIND_LORA else torch.cat(
            [layer.lora_AT[:, :width], layer.lora_AT[:, R : R + width]], dim=1)
        ln = torch.stack([layer.ln_weight[:, :width], layer.ln_bias[:, :width]], dim=1)
        banks = SlotBanks(at.contiguous(), layer.lora_B[:, :, :width].contiguous(), ln)
        layer._banks[(kind, width)] = banks
    return banks


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
        banks = _banks(layer, KIND_LORA, width)
        if same is not None:
            return F.linear(F.linear(x, banks.at[same]), banks.b[same])
        hidden = torch.bmm(x, banks.at.index_select(0, slots).transpose(1, 2))
        return torch.bmm(hidden, banks.b.index_select(0, slots).transpose(1, 2))


class DualLoRAKernel:
    """Batched ``s · B(ReLU(T x) ⊙ LN(A x))``; ``A`` and ``T`` are applied in one matmul."""

    kind = KIND_DUAL

    @staticmethod
    def _gate(layer: SlotLinear, hidden: torch.Tensor, ln: torch.Tensor, slots: torch.Tensor | int, width: int,
              full: bool) -> torch.Tensor:
        """``hidden``: ``[..., 2w]`` = [A x | T x] → ``ReLU(T x) ⊙ LN(A x)``: ``[..., w]``.

        ``ln``: the rows' LayerNorm weight and bias, ``[2, w]`` (one slot) or ``[n, 2, w]``.
        ``full``: every row's rank is ``width``, so LayerNorm runs over all ``w`` entries.
        """
        skill, task = hidden[..., :width], hidden[..., width:]
        if isinstance(slots, torch.Tensor):
            weight, bias = ln[:, :1], ln[:, 1:]  # [n, 1, w], against hidden's [n, L, w]
        else:
            weight, bias = ln[0], ln[1]
        if full:
            normed = F.layer_norm(skill, (width,), eps=LN_EPS)
        else:
            # LayerNorm over each adapter's own r entries; the zero padding stays out of the stats.
            ranks = layer.rank.index_select(0, slots) if isinstance(slots, torch.Tensor) else layer.rank[slots]
            r = ranks.clamp(min=1).to(skill.dtype)  # (a row without adapter: rank 0, all masked, stays 0)
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
        banks = _banks(layer, KIND_DUAL, width)
        if same is not None:
            gated = cls._gate(layer, F.linear(x, banks.at[same]), banks.ln[same], same, width, full)
            return F.linear(gated, banks.b[same])
        hidden = torch.bmm(x, banks.at.index_select(0, slots).transpose(1, 2))
        gated = cls._gate(layer, hidden, banks.ln.index_select(0, slots), slots, width, full)
        return torch.bmm(gated, banks.b.index_select(0, slots).transpose(1, 2))


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
        self._banks: dict[tuple[int, int], SlotBanks] = {}  # per (kind, rank width); see _banks

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
        # B is kept multiplied by the scale: one multiply fewer in every forward of every layer.
        self.lora_B[slot, :, :r] = (weights.lora_B * weights.scale).to(self.lora_B)
        self.scale[slot] = weights.scale
        self.rank[slot] = r
        self.kind[slot] = KIND_OF[weights.kind]
        self._kinds[slot] = KIND_OF[weights.kind]
        self._ranks[slot] = r
        self._banks = {}  # cut again from the banks just written

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
        self._banks = {}

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.n_slots:
            raise IndexError(f"slot {slot} out of range 1..{self.n_slots}")

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # Keep the host-side kind list in sync when buffers are moved or cast.
        out = super()._apply(fn, recurse)
        self._banks = {}
        self._kinds = [int(k) for k in self.kind.tolist()]
        self._ranks = [int(r) for r in self.rank.tolist()]
        return out

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, L, d_in]`` (or ``[B, d_in]``) → ``[B, L, d_out]``.

        In a pass mostly of padding the base linear runs over the real positions only
        (:mod:`service.model.packing`); the adapter deltas keep the padded layout.
        """
        y = linear_over_tokens(self.base, x)
        batch = current_batch()
        if batch is None:
            return y
        if batch.trainable is not None:
            weights = batch.trainable.get(self.path)
            if weights is None:
                return y
            # Trainable weights stay float32 (the optimizer's master copy) on a half-precision base:
            # its activations are cast up for the adapter and its delta back down.
            return y + weights(x.to(weights.lora_A.dtype)).to(y.dtype)
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
        """Rows on different slots: each kernel handles the rows whose slot holds its kind.

        In a decode step (one token per row) the rows without an adapter ride along with the first
        kernel: their slot holds zeros, so their delta is exactly 0, and no rows need picking out
        and adding back (two gathers and a scatter per layer, which cost more than the few zero
        products at one token per row; at prompt lengths the zero products would cost more).
        """
        kinds = [self._kinds[i] for i in ids]
        present = [kernel for kernel in KERNELS if kernel.kind in kinds]
        if not present:
            return y
        slots = slot_ids.to(x.device)
        ride_along = x.shape[1] == 1
        for n, kernel in enumerate(present):
            mine = [i for i, k in enumerate(kinds) if k == kernel.kind or (ride_along and n == 0 and k == KIND_NONE)]
            ranks = {self._ranks[ids[i]] for i in mine if kinds[i] != KIND_NONE}
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
