"""Which attention kernel a base runs, and two wrappers of SDPA for a CPU.

PyTorch's CPU flash-attention kernel is slower in bfloat16 than in float32 at the demo base's
shapes: on a quiet 2-core AMX Xeon (torch 2.13), one decode step of 16 rows (one query over
~170 cached keys, 4 heads of 64) took 451 us in bfloat16 against 279 us computed in float32,
and a 16-row prefill took the same in both (``bench/attention_kernels.py``). So on a CPU a
half-precision base runs attention in float32: the query, keys and values are upcast, SDPA runs,
and the output is cast back. Weights, KV cache and every linear stay in the half dtype, which is
where AMX pays.

A join pass (:meth:`~service.model.generate.RunningBatch.step`) is as wide as the longest
newcomer's prompt, and each running row brings one token, in the last position: inside a
:func:`last_query_rows` block those rows attend with that query alone and the newcomers with all
of theirs, as two SDPA calls (:func:`rows_split`), instead of every row with every position. On a
2-core CPU a 16-row join pass of 12 running rows and 7 newcomers (15 positions) went from 22.2 to
20.7 ms in float32 and from 15.6 to 13.8 ms in bfloat16 (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA_FLOAT32 = "sdpa_float32"
"""Name under which :func:`sdpa_float32_attention` is registered with transformers."""

HALF_DTYPES = (torch.bfloat16, torch.float16)


def sdpa_float32_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention computed in float32.

    ``query [B, heads, Tq, d]``, ``key``/``value [B, kv_heads, Tk, d]``, ``attention_mask`` boolean
    (True = attend) or additive, ``[B, 1, Tq, Tk]``. Returns ``[B, Tq, heads, d]`` in the query's
    dtype, as transformers' own attention functions do.
    """
    dtype = query.dtype
    if dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(dtype), weights


_last_query_rows: ContextVar[int] = ContextVar("last_query_rows", default=0)


@contextlib.contextmanager
def last_query_rows(n: int) -> Iterator[None]:
    """Inside this block, the first ``n`` rows of a pass of several positions attend with their last
    query only (their other positions are padding, whose outputs nothing reads)."""
    token = _last_query_rows.set(n)
    try:
        yield
    finally:
        _last_query_rows.reset(token)


def leading_last_only_rows(real: torch.Tensor) -> int:
    """How many leading rows of ``real [B, L]`` (1 = a token) hold one token, in the last position:
    the running rows of a join pass."""
    single = (real[:, -1] == 1) & (real[:, :-1] == 0).all(-1)
    return int(single.long().cumprod(0).sum())  # (the leading run of such rows)


AttentionFunction = Callable[..., tuple[torch.Tensor, None]]


def rows_split(inner: AttentionFunction) -> AttentionFunction:
    """``inner`` attention, but inside a :func:`last_query_rows` block the leading rows' last queries
    and the other rows run as two calls (the leading rows' other positions get zeros)."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
        n = _last_query_rows.get()
        batch, _, length, _ = query.shape
        if not 0 < n < batch or length == 1 or attention_mask is None or attention_mask.shape[0] != batch:
            return inner(module, query, key, value, attention_mask, **kwargs)
        last, _ = inner(module, query[:n, :, -1:], key[:n], value[:n], attention_mask[:n, :, -1:], **kwargs)
        rest, _ = inner(module, query[n:], key[n:], value[n:], attention_mask[n:], **kwargs)
        out = rest.new_zeros(batch, *rest.shape[1:])  # [B, L, heads, d]
        out[:n, -1:] = last
        out[n:] = rest
        return out, None

    return attention


SDPA_ROWS = "sdpa_rows"
"""transformers' SDPA with :func:`rows_split` (full-precision bases on a CPU)."""

AttentionInterface.register(SDPA_FLOAT32, rows_split(sdpa_float32_attention))
AttentionInterface.register(SDPA_ROWS, rows_split(sdpa_attention_forward))
for _name in (SDPA_FLOAT32, SDPA_ROWS):
    ALL_MASK_ATTENTION_FUNCTIONS.register(_name, sdpa_mask)  # the masks SDPA takes


def attention_for(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """The attention implementation to run on ``device`` in ``dtype``; None keeps the model's own (SDPA)."""
    if torch.device(device).type == "cpu":
        return SDPA_FLOAT32 if dtype in HALF_DTYPES else SDPA_ROWS
    return None
