"""The demo recipe's language stage: with and without VCE (the ablation's two arms)."""

from __future__ import annotations

import pytest
import torch

from service.demo.data import build_pool
from service.demo.train_base import train_language


@pytest.mark.parametrize("train_vce", [True, False])
def test_language_stage_trains_vce_only_when_asked(tiny_base, train_vce):
    size = tiny_base.model.config.vision_config.image_size
    pool = build_pool(16, seed=5, size=size)
    projector = tiny_base.projector
    vce_before = {k: v.clone() for k, v in projector.state_dict().items() if not k.startswith("mlp.")}
    mlp_before = {k: v.clone() for k, v in projector.mlp.state_dict().items()}
    llm_before = tiny_base.model.model.language_model.layers[0].mlp.up_proj.weight.clone()

    loss, steps = train_language(tiny_base, pool, steps=2, batch_size=4, lr=1e-2, seed=0, train_vce=train_vce)

    assert steps == 2 and loss > 0
    assert not torch.equal(llm_before, tiny_base.model.model.language_model.layers[0].mlp.up_proj.weight)
    assert any(not torch.equal(v, projector.mlp.state_dict()[k]) for k, v in mlp_before.items())
    vce_after = {k: v for k, v in projector.state_dict().items() if not k.startswith("mlp.")}
    vce_changed = any(not torch.equal(v, vce_after[k]) for k, v in vce_before.items())
    assert vce_changed == train_vce
    if not train_vce:  # still the identity: zero output projection, so the projector is plain LLaVA
        assert torch.count_nonzero(projector.attention.output_proj.weight) == 0
    assert all(not p.requires_grad for p in tiny_base.model.parameters())
