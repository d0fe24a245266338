"""Which attention kernel a base runs, and one of our own for half-precision weights on a CPU.

PyTorch's CPU flash-attention kernel is slower in bfloat16 than in float32 at the demo base's
shapes: on a quiet 2-core AMX Xeon (torch 2.13), one decode step of 16 rows (one query over
~170 cached keys, 4 heads of 64) took 451 us in bfloat16 against 279 us computed in float32,
and a 16-row prefill took the same in both (``bench/attention_kernels.py``). So on a CPU a
half-precision base runs attention in float32: the query, keys and values are upcast, SDPA runs,
and the output is cast back. Weights, KV cache and every linear stay in the half dtype, which is
where AMX pays.
"""

from __future__ import annotations

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


AttentionInterface.register(SDPA_FLOAT32, sdpa_float32_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_FLOAT32, sdpa_mask)  # the masks SDPA takes


def attention_for(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """The attention implementation to run on ``device`` in ``dtype``; None keeps the model's own (SDPA)."""
    if torch.device(device).type == "cpu" and dtype in HALF_DTYPES:
        return SDPA_FLOAT32
    return None
