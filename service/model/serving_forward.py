"""The language model's forward pass for serving, as a plain loop over the model's own modules.

transformers runs each forward pass through layers of general machinery: decorators on the LLaVA
model, the language model, every decoder layer and every attention (output capturing, default
arguments from the config, deprecated-argument checks, gradient checkpointing, the kernel hub's
routing) and a mask factory written for every kind of attention. On the demo base that glue is a
fixed 0.5-0.7 ms of every pass on a 2-core CPU, whatever the batch: a one-row float32 decode step
took 2.27 ms through ``LlavaForConditionalGeneration.forward`` and 1.81 ms here, a 12-row one 4.97
against 4.35 ms (``bench/serving_forward.py``, docs/benchmarks.md). An answer of a dozen tokens is
a dozen passes.

:class:`ServingForward` runs the same modules (embeddings, RMSNorms, the adapter slot linears,
the rotary embedding, MLPs, the LM head), the same cache and the same registered attention
function, with the boolean mask that transformers would build (:func:`causal_padding_mask`). It
applies only where it computes exactly what transformers does (:func:`unsupported_reason`): a
Llama language model, an SDPA-style attention, inference. Anything else, training included, runs
transformers' own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaModel, apply_rotary_pos_emb

_ATTRIBUTE = "_serving_forward"


@dataclass
class ServingOutput:
    """What callers read of transformers' ``LlavaCausalLMOutputWithPast``: ``logits [B, L or 1, V]``
    and the ``cache`` the pass wrote into."""

    logits: torch.Tensor
    cache: Cache


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`ServingForward` cannot stand in for ``model``'s forward right now, or None if it can.

    ``model``: a ``LlavaForConditionalGeneration``. Checked per pass, as it can change: the
    attention implementation (``set_attn_implementation``), training mode, autograd.
    """
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if type(language_model) is not LlamaModel:
        return f"language model {type(language_model).__name__} (only LlamaModel is reproduced)"
    config = language_model.config
    if getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    implementation = config._attn_implementation
    if ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is not sdpa_mask:
        return f"attention {implementation!r} does not take SDPA's boolean masks"
    if model.training:
        return "training mode"
    if torch.is_grad_enabled():
        return "autograd is on"
    return None


def causal_padding_mask(attention_mask: torch.Tensor, q_length: int, past: int) -> torch.Tensor | None:
    """The mask transformers' ``create_causal_mask`` gives SDPA for ``q_length`` new positions after
    ``past`` cached ones.

    ``attention_mask [B, T]`` (1 = a token) covers the cache's columns and then the new ones
    (``T >= past + q_length``; missing columns count as padding, as in transformers). Returns
    ``[B, 1, q_length, past + q_length]`` boolean, True = attend: new position ``i`` sees the
    unpadded columns up to ``past + i``. None where SDPA's own causal flag does the same (no
    padding, and a single query or nothing cached), as transformers returns then.
    """
    kv_length = past + q_length
    padding = attention_mask.bool()
    if padding.shape[1] < kv_length:
        padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[1]))
    padding = padding[:, :kv_length]
    if (q_length == 1 or past == 0) and bool(padding.all()):
        return None
    queries = torch.arange(past, kv_length, device=padding.device)
    causal = torch.arange(kv_length, device=padding.device) <= queries[:, None]  # [q, kv]
    return causal[None, None] & padding[:, None, None, :]


class ServingForward:
    """``LlavaForConditionalGeneration.forward`` for text passes over a cache, without its glue.

    Holds references to the model's modules; the model's weights, adapter slots and attention
    implementation are read at each call. Make one with :func:`serving_forward`.
    """

    def __init__(self, model: nn.Module):
        self.language_model: LlamaModel = model.model.language_model
        self.lm_head: nn.Module = model.lm_head

    def __call__(self, *, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 cache: Cache | None = None, last_only: bool = False) -> ServingOutput:
        """One pass over new positions ``[B, L]`` (``input_ids``, or ``inputs_embeds [B, L, d]``).

        ``attention_mask [B, T]``: the cache's columns then the new ones; ``position_ids [B, L]``
        (default: counting on from the cache's length, as transformers does); ``cache``: written
        into (default: a new one). ``last_only``: logits of the last position only, ``[B, 1, V]``.
        """
        lm = self.language_model
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden = lm.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, d]
        batch, length = hidden.shape[:2]
        if cache is None:
            cache = DynamicCache(config=lm.config)
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=hidden.device).unsqueeze(0)
        mask = causal_padding_mask(attention_mask.to(hidden.device), length, past)
        cos, sin = lm.rotary_emb(hidden, position_ids=position_ids)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(lm.config._attn_implementation, None)
        for index, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
            attn = layer.self_attn
            heads = (batch, length, -1, attn.head_dim)
            x = layer.input_layernorm(hidden)
            query = attn.q_proj(x).view(heads).transpose(1, 2)  # [B, heads, L, head_dim]
            key = attn.k_proj(x).view(heads).transpose(1, 2)  # [B, kv_heads, L, head_dim]
            value = attn.v_proj(x).view(heads).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key, value = cache.update(key, value, index)  # [B, kv_heads, T, head_dim]
            out, _ = attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)  # [B, L, heads, d]
            hidden = hidden + attn.o_proj(out.reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = lm.norm(hidden)
        if last_only:
            # (an index, not a slice: the contiguous [B, 1, d] takes one plain matmul; see generate._forward)
            hidden = hidden.index_select(1, torch.tensor([length - 1], device=hidden.device))
        return ServingOutput(self.lm_head(hidden), cache)


def serving_forward(model: nn.Module) -> ServingForward | None:
    """``model``'s :class:`ServingForward` (made once, kept on the model), or None where
    :func:`unsupported_reason` says it does not apply to this pass."""
    if unsupported_reason(model) is not None:
        return None
    forward = model.__dict__.get(_ATTRIBUTE)
    if forward is None:
        forward = ServingForward(model)
        model.__dict__[_ATTRIBUTE] = forward
    return forward
