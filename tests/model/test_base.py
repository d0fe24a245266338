"""Loading a local LLaVA directory as a VCE base; saving and loading it back bit-exactly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from service.model.base import BaseModelError, load_base, save_base, vce_state_dict


def test_base_without_vce_weights_gets_identity_vce_and_a_warning(tiny_base_dir, caplog):
    # Set on the module's own logger: another test may have raised its level.
    with caplog.at_level(logging.WARNING, logger="service.model.base"):
        base = load_base(tiny_base_dir, n_slots=2, max_rank=4)
    assert any("identity VCE" in r.message for r in caplog.records)
    assert torch.count_nonzero(base.projector.attention.output_proj.weight) == 0
    assert base.vce_config.feature_layers[0] == -2
    assert all(not p.requires_grad for p in base.model.parameters())


def test_save_load_round_trips_bit_exactly_and_stays_a_stock_llava_dir(tiny_base, tmp_path):
    with torch.no_grad():
        for p in vce_state_dict(tiny_base.projector).values():
            p.normal_(std=0.02)  # a "trained" VCE
    save_base(tiny_base, tmp_path / "saved")
    loaded = load_base(tmp_path / "saved", n_slots=4, max_rank=8)

    ours = {k: v for k, v in tiny_base.model.state_dict().items()}
    theirs = loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert loaded.fingerprint != tiny_base.fingerprint  # VCE weights changed since the first load
    assert loaded.vce_config == tiny_base.vce_config

    # transformers alone still reads the directory as plain LLaVA (projector keys unchanged).
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert isinstance(plain.config.vision_feature_layer, int)
    vce_keys = load_file(str(tmp_path / "saved" / "vce.safetensors")).keys()
    assert all(not k.startswith("mlp.") for k in vce_keys)
    assert json.loads((tmp_path / "saved" / "vce_config.json").read_text())["feature_layers"][0] == -2


def test_fingerprint_is_stable_across_loads_and_dtypes(tiny_base_dir):
    a = load_base(tiny_base_dir, n_slots=0)
    b = load_base(tiny_base_dir, n_slots=1, max_rank=2)
    c = load_base(tiny_base_dir, n_slots=0, dtype=torch.bfloat16)
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert a.fingerprint.startswith("sha256:")


def test_fingerprint_changes_when_weights_change(tiny_base_dir, tmp_path):
    base = load_base(tiny_base_dir, n_slots=0)
    with torch.no_grad():
        base.model.model.language_model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    save_base(base, tmp_path / "changed")
    assert load_base(tmp_path / "changed", n_slots=0).fingerprint != base.fingerprint


def test_not_a_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="config.json"):
        load_base(tmp_path)
