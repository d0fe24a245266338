"""Per-forward adapter metadata: which slot each batch row uses, or a trainable adapter.

Like vLLM's LoRA mapping, the metadata is set once per forward pass and read by every adapter
layer; unlike a global ``set_adapter`` it lives in a :class:`contextvars.ContextVar`, so a serving
thread and a training thread can run forwards on the same model at the same time without seeing
each other's adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from service.model.lora.weights import AdapterWeights


@dataclass(frozen=True)
class AdapterBatch:
    """``slot_ids``: ``[B]`` long tensor, one resident slot per row (0 = no adapter).

    ``trainable``: when set, every row uses this adapter's (gradient-carrying) weights instead of
    the slot banks; used by training.
    """

    slot_ids: torch.Tensor | None = None
    trainable: AdapterWeights | None = None
    # Host-side views computed once per forward, so layers never sync with the device.
    ids: tuple[int, ...] = ()
    all_same_slot: int | None = None


_current: ContextVar[AdapterBatch | None] = ContextVar("adapter_batch", default=None)


def current_batch() -> AdapterBatch | None:
    return _current.get()


@contextlib.contextmanager
def adapter_batch(slot_ids: torch.Tensor | list[int] | None = None, trainable: AdapterWeights | None = None) -> Iterator[AdapterBatch]:
    """Run forwards inside this block with per-row slots (or a trainable adapter)."""
    same: int | None = None
    ids: list[int] = []
    if slot_ids is not None:
        ids = slot_ids.tolist() if isinstance(slot_ids, torch.Tensor) else [int(i) for i in slot_ids]
        if not isinstance(slot_ids, torch.Tensor):
            slot_ids = torch.tensor(ids, dtype=torch.long)
        if ids and all(i == ids[0] for i in ids):
            same = ids[0]
    batch = AdapterBatch(slot_ids=slot_ids, trainable=trainable, ids=tuple(ids), all_same_slot=same)
    token = _current.set(batch)
    try:
        yield batch
    finally:
        _current.reset(token)
