"""Linears over the real tokens of a padded pass only.

A pass over rows of different lengths is laid out ``[B, L]`` with padding, and a join pass (see
:meth:`~service.model.generate.RunningBatch.step`) is mostly padding: each running row brings one
token into a pass as wide as the longest newcomer's prompt (16 rows of which 12 are running and 4
join with 8-12 tokens: 53 real positions of 192). Attention needs that layout, but a linear maps
each position on its own, so inside a :func:`packed_tokens` block the slot layers' base linears
gather the real positions, multiply only those, and scatter the results back. Padding gets
zeros, which nothing reads: padded keys are masked, and padded queries' outputs are never used.
On a 2-core CPU this took a 16-row join pass of 12 positions from 14.9 to 13.5 ms in bfloat16
and from 21.8 to 18.0 ms in float32, with the same logits (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

MAX_REAL_FRACTION = 0.75
"""Pack only a pass with at most this share of real positions. A judgement, not a tuned optimum:
the gathers and scatters cost the same whatever the padding, and a pass with little of it would
not earn them back (the join passes this is for are two thirds padding or more)."""
MIN_POSITIONS = 32
"""Nor a pass smaller than this (``B * L``), where the multiplies cost little either way."""


class PackedTokens:
    """The real positions of a ``[rows, length]`` pass: ``index [N]``, flat into ``rows * length``.

    Remembers the last input it gathered: the query, key and value projections (and the MLP's
    gate and up) read the same hidden states, which are gathered once.
    """

    def __init__(self, index: torch.Tensor, rows: int, length: int):
        self.index, self.rows, self.length = index, rows, length
        self._input: torch.Tensor | None = None
        self._version = -1
        self._gathered: torch.Tensor | None = None

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is laid out ``[rows, length, d]``, as this pass is."""
        return x.dim() == 3 and x.shape[0] == self.rows and x.shape[1] == self.length

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x [rows, length, d]`` → ``[N, d]``, the real positions in row-major order."""
        # (an in-place write to ``x`` since the last gather bumps its version: gather again)
        if x is not self._input or x._version != self._version:
            self._gathered = x.reshape(-1, x.shape[-1]).index_select(0, self.index)
            self._input, self._version = x, x._version
        return self._gathered

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """``y [N, d]`` → ``[rows, length, d]``, zeros at the padding."""
        out = y.new_zeros(self.rows * self.length, y.shape[-1])
        return out.index_copy_(0, self.index, y).view(self.rows, self.length, y.shape[-1])


_current: ContextVar[PackedTokens | None] = ContextVar("packed_tokens", default=None)


def packing_for(real: torch.Tensor) -> PackedTokens | None:
    """The packing of a pass whose new positions are ``real [B, L]`` (1 = a token), or None when
    it would not pay (see :data:`MAX_REAL_FRACTION`, :data:`MIN_POSITIONS`)."""
    if real.dim() != 2 or real.numel() < MIN_POSITIONS:
        return None
    index = real.reshape(-1).nonzero().squeeze(1)
    if index.numel() > MAX_REAL_FRACTION * real.numel():
        return None
    return PackedTokens(index, real.shape[0], real.shape[1])


@contextlib.contextmanager
def packed_tokens(packing: PackedTokens | None) -> Iterator[PackedTokens | None]:
    """Run :func:`linear_over_tokens` inside this block over ``packing``'s positions (None: as usual).

    A :class:`~contextvars.ContextVar`, like the adapter metadata: a training thread's forwards
    never see a serving thread's packing.
    """
    token = _current.set(packing)
    try:
        yield packing
    finally:
        _current.reset(token)


def linear_over_tokens(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for a position-wise ``linear``; inside a :func:`packed_tokens` block whose
    layout ``x [B, L, d_in]`` has, over the real positions only (zeros at the padding)."""
    packing = _current.get()
    if packing is None or not packing.fits(x):
        return linear(x)
    return packing.scatter(linear(packing.gather(x)))
