"""Dual-LoRA and LoRA adapters held in fixed slots of the base model's linears."""

from service.model.lora.config import AdapterConfig, AdapterConfigError
from service.model.lora.context import adapter_batch, current_batch
from service.model.lora.io import AdapterLoadError, load_adapter, save_adapter
from service.model.lora.layers import SlotLinear
from service.model.lora.slots import AdapterSlots, inject_adapter_slots
from service.model.lora.weights import AdapterWeights, DualLoRAWeights, LoRAWeights

__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterLoadError",
    "AdapterSlots",
    "AdapterWeights",
    "DualLoRAWeights",
    "LoRAWeights",
    "SlotLinear",
    "adapter_batch",
    "current_batch",
    "inject_adapter_slots",
    "load_adapter",
    "save_adapter",
]
