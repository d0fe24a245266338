"""Adapter directories on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys follow PEFT: ``base_model.model.<module path>.lora_A.weight`` (``[r, d_in]``),
``lora_B.weight`` (``[d_out, r]``); Dual-LoRA adds ``lora_T.weight`` (``[r, d_in]``) and
``lora_ln.weight`` / ``lora_ln.bias`` (``[r]``). A plain LoRA directory written by ``peft`` loads
as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from service.model.lora.config import AdapterConfig, AdapterConfigError
from service.model.lora.slots import AdapterSlots
from service.model.lora.weights import WEIGHT_CLASSES, AdapterWeights

WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<part>lora_A|lora_B|lora_T|lora_ln)(?:\.default)?\.(?P<kind>weight|bias)$")
_PARTS = {
    ("lora_A", "weight"): "lora_A",
    ("lora_B", "weight"): "lora_B",
    ("lora_T", "weight"): "lora_T",
    ("lora_ln", "weight"): "lora_ln_weight",
    ("lora_ln", "bias"): "lora_ln_bias",
}
_REQUIRED = {"LORA": {"lora_A", "lora_B"}, "DUAL_LORA": {"lora_A", "lora_B", "lora_T", "lora_ln_weight", "lora_ln_bias"}}


class AdapterLoadError(ValueError):
    """An adapter cannot be used with this base (wrong base, shapes, files or keys)."""


def save_adapter(directory: str | Path, config: AdapterConfig, adapter: AdapterWeights) -> None:
    """Write ``adapter`` to ``directory`` (created if needed); tensors are stored as they are."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in adapter.items():
        for name, tensor in module.tensors().items():
            tensors[f"base_model.model.{path}.{name}"] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "peft_type": config.peft_type})
    config.save(directory)


def load_adapter(
    directory: str | Path,
    slots: AdapterSlots,
    base_fingerprint: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[AdapterConfig, AdapterWeights]:
    """Read and validate an adapter directory against the model's slots and fingerprint."""
    directory = Path(directory)
    try:
        config = AdapterConfig.load(directory)
    except AdapterConfigError as exc:
        raise AdapterLoadError(str(exc)) from exc
    if base_fingerprint and config.base_model_fingerprint and config.base_model_fingerprint != base_fingerprint:
        raise AdapterLoadError(
            f"adapter was trained for base {config.base_model_fingerprint}, this server runs {base_fingerprint}"
        )
    if config.r > slots.max_rank:
        raise AdapterLoadError(f"adapter rank {config.r} exceeds the server's max rank {slots.max_rank}")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterLoadError(f"{WEIGHTS_FILE} not found in {directory}")
    try:
        raw = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _KEY.match(key)
        part = _PARTS.get((match["part"], match["kind"])) if match else None
        if part is None:
            raise AdapterLoadError(f"unexpected tensor {key!r} in {WEIGHTS_FILE}")
        module_path = match["path"]
        if "vision_tower" in module_path or "multi_modal_projector" in module_path:
            raise AdapterLoadError(f"{key!r}: adapters on the vision tower or projector are not supported")
        ours = slots.resolve(module_path)
        if ours is None:
            raise AdapterLoadError(
                f"{key!r} targets {module_path}, which has no adapter slot (slots on {slots.target_modules})"
            )
        parts.setdefault(ours, {})[part] = tensor
    if not parts:
        raise AdapterLoadError(f"{WEIGHTS_FILE} holds no adapter tensors")

    cls = WEIGHT_CLASSES[config.peft_type]
    modules = {}
    for path, tensors in parts.items():
        missing = _REQUIRED[config.peft_type] - tensors.keys()
        if missing:
            raise AdapterLoadError(f"{path}: missing {sorted(missing)} for a {config.peft_type} adapter")
        layer = slots.layers[path]
        module = cls(layer.in_features, layer.out_features, config.r, config.scale)
        for name, tensor in tensors.items():
            target = getattr(module, name, None)
            if target is None:
                raise AdapterLoadError(f"{path}: {name} does not belong in a {config.peft_type} adapter")
            if tuple(tensor.shape) != tuple(target.shape):
                raise AdapterLoadError(
                    f"{path}.{name}: shape {tuple(tensor.shape)} does not match the base's {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.data = tensor.to(dtype)
        modules[path] = module
    return config, AdapterWeights(config.peft_type, modules)
