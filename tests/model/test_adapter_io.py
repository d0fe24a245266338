"""Adapter directories: round trips, refusals, and PEFT-made LoRA adapters in our slots."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.model.lora import AdapterConfig, AdapterLoadError, adapter_batch, load_adapter, save_adapter


def random_adapter(base, peft_type="DUAL_LORA", r=4, seed=0):
    config = AdapterConfig(peft_type=peft_type, r=r, lora_alpha=2 * r, base_model_fingerprint=base.fingerprint)
    adapter = base.slots.new_adapter(config, seed=seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return config, adapter


@pytest.mark.parametrize("peft_type", ["DUAL_LORA", "LORA"])
def test_save_load_round_trips_bit_exactly(tiny_base, tmp_path, peft_type):
    config, adapter = random_adapter(tiny_base, peft_type)
    save_adapter(tmp_path / "a", config, adapter)
    on_disk = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == peft_type and on_disk["base_model_fingerprint"] == tiny_base.fingerprint
    loaded_config, loaded = load_adapter(tmp_path / "a", tiny_base.slots, tiny_base.fingerprint)
    assert loaded_config == config
    want, got = adapter.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_adapter_for_another_base_is_refused(tiny_base, tmp_path):
    config, adapter = random_adapter(tiny_base)
    config.base_model_fingerprint = "sha256:0000"
    save_adapter(tmp_path / "a", config, adapter)
    with pytest.raises(AdapterLoadError, match="trained for base"):
        load_adapter(tmp_path / "a", tiny_base.slots, tiny_base.fingerprint)


def test_wrong_shapes_unknown_modules_and_missing_parts_are_refused(tiny_base, tmp_path):
    config, adapter = random_adapter(tiny_base)
    save_adapter(tmp_path / "a", config, adapter)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))

    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    bad = dict(tensors, **{key: torch.zeros(4, 3)})
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="shape"):
        load_adapter(tmp_path / "a", tiny_base.slots, tiny_base.fingerprint)

    bad = dict(tensors, **{"base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="no adapter slot"):
        load_adapter(tmp_path / "a", tiny_base.slots, tiny_base.fingerprint)

    bad = {k: v for k, v in tensors.items() if "lora_T" not in k}
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="missing"):
        load_adapter(tmp_path / "a", tiny_base.slots, tiny_base.fingerprint)

    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterLoadError, match="safetensors"):
        load_adapter(tmp_path / "a", tiny_base.slots, tiny_base.fingerprint)

    (tmp_path / "a" / "adapter_config.json").write_text("{bad json")
    with pytest.raises(AdapterLoadError, match="JSON"):
        load_adapter(tmp_path / "a", tiny_base.slots, tiny_base.fingerprint)


def test_rank_above_the_slot_rank_is_refused(tiny_base, tmp_path):
    config = AdapterConfig(peft_type="LORA", r=16, lora_alpha=16)
    from service.model.lora.weights import AdapterWeights, LoRAWeights

    path = next(iter(tiny_base.slots.layers))
    layer = tiny_base.slots.layers[path]
    save_adapter(tmp_path / "a", config, AdapterWeights("LORA", {path: LoRAWeights(layer.in_features, layer.out_features, 16, 1.0)}))
    with pytest.raises(AdapterLoadError, match="max rank"):
        load_adapter(tmp_path / "a", tiny_base.slots)


@pytest.mark.parametrize("options", [{"use_dora": True}, {"bias": "all"}, {"target_modules": ".*proj"}])
def test_unsupported_peft_options_are_refused(tiny_base, tmp_path, options):
    config, adapter = random_adapter(tiny_base, "LORA")
    save_adapter(tmp_path / "a", config, adapter)
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    data.update(options)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError):
        load_adapter(tmp_path / "a", tiny_base.slots)


def _logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_lora_adapter_gives_the_same_logits_in_our_slot(tiny_base_dir, tiny_base, tmp_path, use_rslora):
    peft = pytest.importorskip("peft")
    from transformers import LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora, lora_dropout=0.0,
        exclude_modules=r".*vision_tower.*",
    )
    peft_model = peft.get_peft_model(plain, lora_config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path / "peft-adapter")

    size = plain.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 7, 8] + [plain.config.image_token_id] * tiny_base.tokens_per_image + [9, 10, 11]])
    want = _logits(peft_model, ids, pixels)

    _, adapter = load_adapter(tmp_path / "peft-adapter", tiny_base.slots, tiny_base.fingerprint)
    tiny_base.slots.load(2, adapter)
    with adapter_batch([2]):
        got = _logits(tiny_base.model, ids, pixels)
    with adapter_batch([0]):
        base_logits = _logits(tiny_base.model, ids, pixels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base_logits, want, atol=1e-3)  # the adapter really does something
