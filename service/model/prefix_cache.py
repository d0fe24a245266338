"""The keys and values of a prompt's image prefix, computed once per (images, weights) and reused.

A prompt reads ``USER: <image>×N {instruction} ASSISTANT:``: everything up to the last image token
(the *prefix*: ~150 of the demo base's ~160 prompt positions) is the same for every question asked
about the same images on the same weights. Like vLLM's automatic prefix caching, whose block hashes
include the LoRA id and the multimodal inputs' hashes, a prefix's KV is keyed by the weights it ran
on (a *scope* the caller names: ``"base"``, or one load of an adapter into a slot), its token ids
and its images' content hashes. A prompt whose prefix is cached skips the vision tower, VCE and
the prefix's share of the prefill: only its own instruction runs, attending to the cached
positions. Entries are kept in an LRU bounded in bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache

from service.lru import SizedLRU
from service.model.kv_cache import DEFAULT_RESERVE, ReservedCache, is_growing


@dataclass(frozen=True)
class PrefixEntry:
    """One prefix's cached keys and values, all layers in one tensor (one copy per row to reuse it):
    ``kv [layers, 2 (keys, values), kv_heads, length, head_dim]``."""

    kv: torch.Tensor

    @property
    def length(self) -> int:
        return self.kv.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixCache(SizedLRU[PrefixEntry]):
    """LRU of :class:`PrefixEntry` keyed by :func:`prefix_key`, holding at most ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int = 256 * 2**20):
        super().__init__(capacity_bytes, size=lambda entry: entry.nbytes)

    @property
    def capacity_bytes(self) -> int:
        return self.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values kept."""
        return self.total


def prefix_length(ids: list[int], image_token_id: int) -> int:
    """How many leading ``ids`` end with the last image token (0 for a prompt without images)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == image_token_id:
            return i + 1
    return 0


def prefix_key(scope: str, prefix_ids: list[int], image_keys: list[str]) -> str:
    """What a prefix's keys and values depend on: the weights (``scope``), its tokens, its images."""
    digest = hashlib.sha256(scope.encode())
    digest.update(b"\0" + ",".join(map(str, prefix_ids)).encode())
    for key in image_keys:
        digest.update(b"\0" + key.encode())
    return digest.hexdigest()


def supports_prefixes(config: PreTrainedConfig) -> bool:
    """Whether the model's KV cache is plain growing layers (a sliding window keeps no prefix)."""
    return all(is_growing(layer) for layer in ReservedCache(config).layers)


def read_prefix(cache: Cache, row: int, start: int, length: int) -> PrefixEntry:
    """Copy row ``row``'s positions ``[start, start + length)`` out of a batch's KV ``cache``."""
    span = slice(start, start + length)
    return PrefixEntry(torch.stack([torch.stack([layer.keys[row, :, span], layer.values[row, :, span]])
                                    for layer in cache.layers]))


def right_aligned_mask(pads: list[int], width: int, device: torch.device) -> torch.Tensor:
    """``mask [len(pads), width]``: 0 on each row's ``pad`` leading columns, 1 after them."""
    mask = torch.zeros(len(pads), width, dtype=torch.long, device=device)
    for row, pad in enumerate(pads):
        mask[row, pad:] = 1
    return mask


def prefix_rows(entries: list[PrefixEntry], width: int, room: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``entries`` side by side, right-aligned to ``width`` positions (at least the longest).

    Returns ``kv [layers, 2, len(entries), kv_heads, width + room, head_dim]`` (zeros on each row's
    left padding; the ``room`` columns after ``width`` are not written) and ``mask [len(entries),
    width]`` (1 on cached positions). Each row is a single copy.
    """
    layers, _, heads, _, dim = entries[0].kv.shape
    buffer = entries[0].kv.new_empty(layers, 2, len(entries), heads, width + room, dim)
    pads = [width - entry.length for entry in entries]
    for i, (entry, pad) in enumerate(zip(entries, pads, strict=True)):
        if pad:
            buffer[:, :, i, :, :pad].zero_()
        buffer[:, :, i, :, pad:width] = entry.kv
    return buffer, right_aligned_mask(pads, width, buffer.device)


def append_prefixes(cache: Cache, entries: list[PrefixEntry], room: int) -> torch.Tensor:
    """Add one row per entry below ``cache``'s rows (every layer a
    :class:`~service.model.kv_cache.ReservedLayer`), right-aligned to the cache's filled length
    (zeros on the left padding), with ``room`` free positions after it; returns their ``mask
    [len(entries), length]`` (1 on cached positions).

    Each entry is copied once, straight into the cache's buffers: stacking the entries first
    (:func:`prefix_rows`) and appending the stack moved every joining row's keys and values twice
    (about 1.2 MB per row of the demo base in float32). The copies, one per entry, layer and
    keys or values, go to one multi-tensor ``_foreach_copy_`` (what ``torch.optim`` uses), which
    spares a dispatch each.
    """
    length = cache.layers[0].get_seq_length()
    pads = [length - entry.length for entry in entries]
    if min(pads) < 0:
        raise ValueError(f"a prefix of {length - min(pads)} positions does not fit a cache of {length}")
    widest, targets, sources = max(pads), [], []
    for index, layer in enumerate(cache.layers):
        for part, rows in enumerate(layer.add_rows(len(entries), room)):
            if widest:
                rows[:, :, :widest].zero_()  # (each row's own prefix overwrites what is not its padding)
            for row, (entry, pad) in enumerate(zip(entries, pads, strict=True)):
                targets.append(rows[row, :, pad:])
                sources.append(entry.kv[index, part])
    torch._foreach_copy_(targets, sources)
    return right_aligned_mask(pads, length, entries[0].kv.device)


def cache_of_prefixes(config: PreTrainedConfig, entries: list[PrefixEntry],
                      room: int = DEFAULT_RESERVE) -> tuple[Cache, torch.Tensor]:
    """A batch KV cache holding ``entries``, one per row, right-aligned to the longest.

    Returns the cache (``[B, kv_heads, P, head_dim]`` per layer, zeros on the left padding, and
    ``room`` more positions to write the rest of the prompts into) and its ``mask [B, P]`` (1 on
    cached positions). Every layer's keys and values are views of one buffer, so each row is a
    single copy.
    """
    width = max(e.length for e in entries)
    buffer, mask = prefix_rows(entries, width, room)
    cache = ReservedCache(config, reserve=room)
    for index, layer in enumerate(cache.layers):
        layer.adopt(buffer[index, 0], buffer[index, 1], width)
    return cache, mask
