"""Named size presets of a LLaVA-architecture model (CLIP-style ViT + Llama LLM), tiny included.

``build_random_base`` writes a randomly initialised base directory — the same kind of directory a
downloaded ``llava-hf`` checkpoint is — so tests and benchmarks go through the real loading code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from service.model.tokenizer import IMAGE, train_tokenizer


@dataclass(frozen=True)
class Preset:
    """Sizes of the vision tower and the language model."""

    vision_dim: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_dim: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    max_positions: int = 1024
    vocab_size: int = 512


PRESETS: dict[str, Preset] = {
    # Unit tests: a forward pass takes milliseconds.
    "tiny": Preset(32, 4, 2, 32, 8, 64, 2, 4, 2, 128, max_positions=256, vocab_size=320),
    # Adapter-overhead benchmark: an LLM of realistic width (8 layers, d=1024, 16 heads).
    "bench": Preset(64, 4, 4, 64, 16, 1024, 8, 16, 16, 2816, max_positions=2048, vocab_size=1024),
    # Serving benchmarks that need every answer to run to max_new_tokens: the demo base's sizes
    # (96 px, 8 px patches: 144 image tokens; 4 Llama layers, d=256) with random weights.
    "demo-shape": Preset(192, 5, 6, 96, 8, 256, 4, 4, 4, 704, max_positions=256, vocab_size=384),
}

_DEFAULT_CORPUS = [
    "USER: <image>\nWhat is in the image? ASSISTANT: a red washer on a conveyor belt",
    "Is this part defective? Where? defect: scratch, top-left. ok",
    "How many parts are there? one two three four 1 2 3 4",
    "What colour is the part? red blue green yellow grey orange black white",
    "Where is the part? top-left top top-right left centre right bottom-left bottom bottom-right",
    "the quick brown fox jumps over the lazy dog. a an and of in on is are was were",
]


def llava_config(preset: Preset, vocab_size: int, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_dim,
        intermediate_size=preset.vision_dim * 4,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        projection_dim=preset.vision_dim,
    )
    text = LlamaConfig(
        hidden_size=preset.text_dim,
        intermediate_size=preset.text_ffn,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=preset.max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(preset.image_size // preset.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_random_base(
    directory: str | Path, preset: str | Preset = "tiny", seed: int = 0, corpus: list[str] | None = None
) -> Path:
    """Write a random LLaVA base (weights, tokenizer, image processor) to ``directory``."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus or _DEFAULT_CORPUS, vocab_size=spec.vocab_size)
    config = llava_config(
        spec, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE), tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    size = spec.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory
    )
    return directory
