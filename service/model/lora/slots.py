"""Injecting adapter slots into a model's language-model linears and filling them."""

from __future__ import annotations

import re

import torch
from torch import nn

from service.model.lora.config import AdapterConfig
from service.model.lora.layers import SlotLinear
from service.model.lora.weights import WEIGHT_CLASSES, AdapterWeights

_LAYER_SUFFIX = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")


def canonical_suffix(path: str) -> str | None:
    """``...language_model.layers.3.self_attn.q_proj`` → ``layers.3.self_attn.q_proj``.

    Lets adapters saved from a PEFT-wrapped full LLaVA *or* a bare Llama resolve to the same slot.
    """
    match = _LAYER_SUFFIX.search(path)
    return match.group(1) if match else None


class AdapterSlots:
    """The slot layers of one model, addressed by module path; slot ids run ``1..n_slots``."""

    def __init__(self, layers: dict[str, SlotLinear], n_slots: int, max_rank: int, target_modules: list[str]):
        self.layers = layers
        self.n_slots, self.max_rank = n_slots, max_rank
        self.target_modules = target_modules
        self._by_suffix = {canonical_suffix(path): path for path in layers}

    def resolve(self, module_path: str) -> str | None:
        """Map a module path written by another tool to one of ours (None if we have no slot there)."""
        if module_path in self.layers:
            return module_path
        suffix = canonical_suffix(module_path)
        return self._by_suffix.get(suffix) if suffix else None

    def new_adapter(self, config: AdapterConfig, seed: int | None = None) -> AdapterWeights:
        """A freshly initialised adapter (B = 0, so it starts as the base) for these slot layers."""
        unknown = set(config.target_modules) - set(self.target_modules)
        if unknown:
            raise ValueError(f"no adapter slots on {sorted(unknown)}; this model has slots on {self.target_modules}")
        generator_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            cls = WEIGHT_CLASSES[config.peft_type]
            layers = {}
            for path, layer in self.layers.items():
                if path.rsplit(".", 1)[-1] in config.target_modules:
                    module = cls(layer.in_features, layer.out_features, config.r, config.scale, config.lora_dropout)
                    layers[path] = module.to(device=layer.weight.device, dtype=torch.float32)
        finally:
            if seed is not None:
                torch.random.set_rng_state(generator_state)
        return AdapterWeights(config.peft_type, layers)

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy ``adapter`` into ``slot`` of every layer; layers it does not cover are cleared.

        Touches only ``slot``: other slots and the base weights are never written.
        """
        for path, _ in adapter.items():
            if path not in self.layers:
                raise ValueError(f"adapter targets {path}, which has no adapter slot")
        for path, layer in self.layers.items():
            layer.load_slot(slot, adapter.get(path))

    def free(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)


def inject_adapter_slots(
    language_model: nn.Module,
    target_modules: list[str] | tuple[str, ...],
    n_slots: int,
    max_rank: int,
    prefix: str = "",
) -> AdapterSlots:
    """Replace every ``nn.Linear`` named in ``target_modules`` with a :class:`SlotLinear`.

    ``prefix`` is the language model's path inside the full model, so slot paths match the full
    model's module names (and PEFT's adapter keys).
    """
    if n_slots < 1 or max_rank < 1:
        raise ValueError("n_slots and max_rank must be at least 1")
    targets = set(target_modules)
    layers: dict[str, SlotLinear] = {}
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and not isinstance(child, SlotLinear):
                path = ".".join(p for p in (prefix, name, child_name) if p)
                slot_layer = SlotLinear(child, path, n_slots, max_rank)
                setattr(module, child_name, slot_layer)
                layers[path] = slot_layer
    if not layers:
        raise ValueError(f"no nn.Linear named {sorted(targets)} found in the language model")
    return AdapterSlots(layers, n_slots, max_rank, sorted(targets))
