"""Loading and saving a LLaVA base model with a VCE projector and adapter slots.

A base directory is an ordinary transformers LLaVA directory (``config.json``, weights, tokenizer,
``preprocessor_config.json``) plus, when it was saved by this project, ``vce_config.json`` and
``vce.safetensors``. transformers alone still loads it as plain LLaVA; :func:`load_base` loads it
with VCE. A directory without VCE weights (e.g. a downloaded ``llava-hf/llava-1.5-7b-hf``) gets an
identity VCE and a logged warning. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from service.lru import SizedLRU
from service.model.attention import attention_for
from service.model.lora.config import DEFAULT_TARGETS
from service.model.lora.layers import SlotLinear
from service.model.lora.slots import AdapterSlots, inject_adapter_slots
from service.model.vce import VCEConfig, VCEProjector

log = logging.getLogger(__name__)

VCE_CONFIG_FILE = "vce_config.json"
VCE_WEIGHTS_FILE = "vce.safetensors"
PROJECTOR_PATH = "model.multi_modal_projector"
LANGUAGE_MODEL_PATH = "model.language_model"


class BaseModelError(ValueError):
    """A base model directory cannot be loaded as a LLaVA + VCE base."""


@dataclass
class PromptFormat:
    """How an instruction and its images become the model's prompt (LLaVA-1.5 style by default)."""

    template: str = "USER: {images}{instruction} ASSISTANT:"
    image_placeholder: str = "<image>\n"
    answer_prefix: str = " "

    def render(self, instruction: str, n_images: int) -> str:
        return self.template.format(images=self.image_placeholder * n_images, instruction=instruction)


PROMPT_CACHE_TOKENS = 2**20
"""Token ids kept by :attr:`BaseModel.prompt_ids`: thousands of prompts in about 8 MB of references,
plus their instructions' text (an instruction is never much longer than its tokens)."""


@dataclass
class BaseModel:
    """A loaded base: the transformers model (with VCE and slots), its tokenizer and image processor."""

    model: LlavaForConditionalGeneration
    tokenizer: object
    image_processor: object
    vce_config: VCEConfig
    model_id: str
    fingerprint: str
    slots: AdapterSlots | None = None
    prompt: PromptFormat = field(default_factory=PromptFormat)
    # Prompts tokenised recently, by instruction and image count (see generate.encode_prompt),
    # at most PROMPT_CACHE_TOKENS token ids in all.
    prompt_ids: SizedLRU[tuple[int, ...]] = field(default_factory=lambda: SizedLRU(PROMPT_CACHE_TOKENS, size=len),
                                                  repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @property
    def tokens_per_image(self) -> int:
        return patch_tokens(self.model.config.vision_config)

    @property
    def max_context(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def projector(self) -> VCEProjector:
        return self.model.model.multi_modal_projector

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` → image features in LLM space ``[N, tokens_per_image, d_llm]``."""
        return self.image_features(pixel_values)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """As :meth:`encode_images` but keeps the autograd graph (to train the projector)."""
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(device=self.device, dtype=self.dtype),
            vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output))

    def preprocess_images(self, images: list) -> torch.Tensor:
        """PIL images → ``[N, 3, S, S]`` pixel values for the vision tower."""
        return self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]


def patch_tokens(vision_config) -> int:
    """Image tokens a square ViT yields (CLS dropped): ``(image_size // patch_size) ** 2``."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def attach_vce(model: LlavaForConditionalGeneration, config: VCEConfig | None = None) -> VCEProjector:
    """Wrap the LLaVA projector in a VCE projector (identity until trained) and select its levels.

    The anchor is the layer the checkpoint already projects (``vision_feature_layer``), so the
    wrapped model's logits are unchanged.
    """
    if isinstance(model.model.multi_modal_projector, VCEProjector):
        raise BaseModelError("this model already has a VCE projector")
    anchor = model.config.vision_feature_layer
    if not isinstance(anchor, int):
        raise BaseModelError("VCE needs a checkpoint that projects a single vision layer")
    if model.config.vision_feature_select_strategy != "default":
        raise BaseModelError("VCE needs vision_feature_select_strategy='default' (CLS dropped)")
    vision = model.config.vision_config
    if config is None:
        config = VCEConfig.for_depth(vision.num_hidden_layers, n_heads=_default_heads(vision.hidden_size))
    if config.feature_layers[0] != anchor:
        raise BaseModelError(f"VCE anchor {config.feature_layers[0]} differs from the projected layer {anchor}")
    n_hidden = vision.num_hidden_layers + 1
    if any(not -n_hidden <= i < n_hidden for i in config.feature_layers):
        raise BaseModelError(f"VCE feature layers {config.feature_layers} exceed the tower's {n_hidden} hidden states")
    old = model.model.multi_modal_projector
    param = next(old.parameters())
    # A fixed seed makes a fresh VCE (and so the base's fingerprint) the same on every load.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        projector = VCEProjector(config, vision.hidden_size, old, n_tokens=patch_tokens(vision),
                                 out_dim=model.config.text_config.hidden_size)
    projector = projector.to(device=param.device, dtype=param.dtype)
    model.model.multi_modal_projector = projector
    model.config.vision_feature_layer = list(config.feature_layers)
    return projector


def _default_heads(dim: int) -> int:
    for heads in (16, 8, 4, 2, 1):
        if dim % heads == 0 and dim // heads >= 8:
            return heads
    return 1


def vce_state_dict(projector: VCEProjector) -> dict[str, torch.Tensor]:
    """VCE's own weights (the wrapped MLP excluded: it lives in the LLaVA checkpoint)."""
    return {k: v for k, v in projector.state_dict().items() if not k.startswith("mlp.")}


@contextlib.contextmanager
def plain_llava(model: LlavaForConditionalGeneration) -> Iterator[LlavaForConditionalGeneration]:
    """Temporarily unwrap VCE and slot layers so the model is stock transformers LLaVA again."""
    projector = model.model.multi_modal_projector
    slot_layers: list[tuple[nn.Module, str, SlotLinear]] = []
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, SlotLinear):
                slot_layers.append((module, name, child))
    layers = model.config.vision_feature_layer
    try:
        if isinstance(projector, VCEProjector):
            model.model.multi_modal_projector = projector.mlp
            model.config.vision_feature_layer = projector.config.feature_layers[0]
        for parent, name, child in slot_layers:
            setattr(parent, name, child.base)
        yield model
    finally:
        model.model.multi_modal_projector = projector
        model.config.vision_feature_layer = layers
        for parent, name, child in slot_layers:
            setattr(parent, name, child)


def fingerprint(model: LlavaForConditionalGeneration, samples_per_tensor: int = 4096) -> str:
    """A short, dtype-independent hash of the base's architecture and weights (VCE included).

    Every parameter contributes a strided sample of its values cast to bfloat16, so a base loaded in
    fp32 on a CPU and in bf16 on a GPU has the same fingerprint, and any retraining changes it.
    """
    digest = hashlib.sha256()
    text, vision = model.config.text_config, model.config.vision_config
    shape = {
        "text": [text.hidden_size, text.num_hidden_layers, text.vocab_size],
        "vision": [vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size],
    }
    digest.update(json.dumps(shape, sort_keys=True).encode())
    with plain_llava(model):
        named = sorted(model.named_parameters())
    projector = model.model.multi_modal_projector
    if isinstance(projector, VCEProjector):
        named += sorted((f"vce.{k}", v) for k, v in vce_state_dict(projector).items())
    with torch.no_grad():
        for name, tensor in named:
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].float().to(torch.bfloat16).view(torch.int16).cpu()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def load_base(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_slots: int = 8,
    max_rank: int = 64,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    vce_config: VCEConfig | None = None,
) -> BaseModel:
    """Load a local LLaVA directory as a VCE base with ``n_slots`` adapter slots (0 = none)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path} is not a model directory (no config.json)")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load a LLaVA model from {path}: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    attention = attention_for(device, dtype)
    if attention is not None:
        model.set_attn_implementation(attention)

    vce_file, vce_weights = path / VCE_CONFIG_FILE, path / VCE_WEIGHTS_FILE
    if vce_file.is_file():
        vce_config = VCEConfig.from_dict(json.loads(vce_file.read_text()))
    projector = attach_vce(model, vce_config)
    if vce_weights.is_file():
        state = load_file(str(vce_weights), device=str(model.device))
        missing = set(vce_state_dict(projector)) - set(state)
        if missing or set(state) - set(vce_state_dict(projector)):
            raise BaseModelError(f"{VCE_WEIGHTS_FILE} does not match the VCE config (missing {sorted(missing)})")
        try:
            projector.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of the wrong shape, e.g. position embeddings for another grid
            raise BaseModelError(f"{VCE_WEIGHTS_FILE} does not fit this model: {exc}") from exc
    else:
        log.warning("%s has no VCE weights: attached an identity VCE (train it to use visual cues)", path)
    projector.requires_grad_(False)

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    base_fingerprint = fingerprint(model)
    slots = None
    if n_slots > 0:
        slots = inject_adapter_slots(
            model.model.language_model, target_modules, n_slots, max_rank, prefix=LANGUAGE_MODEL_PATH
        )
    # The directory name is the id clients see (e.g. "demo-base", "llava-1.5-7b-hf").
    model_id = path.resolve().name
    return BaseModel(model, tokenizer, image_processor, projector.config, str(model_id), base_fingerprint, slots)


def save_base(base: BaseModel, path: str | Path) -> None:
    """Save as a stock LLaVA directory plus ``vce_config.json`` / ``vce.safetensors``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = base.model
    with plain_llava(model):
        model.save_pretrained(path)
    base.tokenizer.save_pretrained(path)
    base.image_processor.save_pretrained(path)
    (path / VCE_CONFIG_FILE).write_text(json.dumps(base.vce_config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in vce_state_dict(base.projector).items()}
    save_file(state, str(path / VCE_WEIGHTS_FILE))
