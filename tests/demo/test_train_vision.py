"""The demo recipe's vision stage: the per-patch defect head, its labels and its data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from service.demo.data import build_defect_pool, build_pool
from service.demo.train_base import DefectHead, train_vision
from service.world import DEFECT_TYPES, generate_examples


def test_defect_pool_labels_the_patch_that_holds_the_defect():
    pool = build_defect_pool(40, seed=3, patch_size=8, size=96)
    assert pool.pixels.shape == (40, 3, 96, 96) and pool.pixels.dtype == torch.uint8
    defective = pool.defect > 0
    assert 0 < defective.sum() < 40  # half defective by default
    assert torch.equal(pool.patch >= 0, defective)
    assert int(pool.patch.max()) < 12 * 12 and int(pool.defect.max()) <= len(DEFECT_TYPES)
    scenes = [record["meta"]["scene"]["defect"] for _, record in generate_examples(40, 3, kind="inspection", size=96)]
    for i, scene_defect in enumerate(scenes):  # a plain reference: column from x, row from y
        if scene_defect is not None:
            assert pool.patch[i] == int(scene_defect["y"] * 12) * 12 + int(scene_defect["x"] * 12)
    coarse = build_defect_pool(40, seed=3, patch_size=32, size=96)  # same scenes, 3x3 patches
    assert torch.equal(coarse.defect, pool.defect)
    rows, cols = pool.patch[defective] // 12, pool.patch[defective] % 12
    assert torch.equal(coarse.patch[defective], (rows * 8 // 32) * 3 + cols * 8 // 32)


def test_defect_pool_refuses_the_evaluation_seed():
    with pytest.raises(ValueError):
        build_defect_pool(2, seed=12345)


def test_defect_loss_matches_a_weighted_cross_entropy_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 1 + len(DEFECT_TYPES))
    defect, patch = torch.tensor([3, 0]), torch.tensor([1, -1])
    # by hand: target 3 on patch 1 of image 0 (weight HW / 4 = 1 here), "none" elsewhere
    total, weights = 0.0, 0.0
    for b in range(2):
        for n in range(4):
            target = 3 if (b == 0 and n == 1) else 0
            w = 4 / 4 if target else 1.0
            total += w * F.cross_entropy(logits[b, n][None], torch.tensor([target])).item()
            weights += w
    assert math.isclose(DefectHead.loss(logits, defect, patch).item(), total / weights, rel_tol=1e-5)
    # with 16 patches the one defect patch weighs 16 / 4 = 4 against 1 for each of the other 15
    logits = torch.zeros(1, 16, 1 + len(DEFECT_TYPES))
    logits[0, 5, 0] = 5.0  # confident "none" on the defect patch: the miss costs 4x
    per_patch = F.cross_entropy(logits[0], torch.tensor([2 if n == 5 else 0 for n in range(16)]), reduction="none")
    expected = (per_patch.sum() + 3 * per_patch[5]) / (15 + 4)
    assert math.isclose(DefectHead.loss(logits, torch.tensor([2]), torch.tensor([5])).item(), expected.item(),
                        rel_tol=1e-5)


def test_image_presence_is_any_patch_more_likely_defective():
    none = torch.tensor([4.0, 0, 0, 0, 0, 0])
    some = torch.tensor([0.0, 4, 0, 0, 0, 0])
    logits = torch.stack([torch.stack([none, none, none]), torch.stack([none, some, none])])
    assert DefectHead.image_presence(logits).tolist() == [False, True]


@pytest.mark.parametrize("warmup", [0, 1])
def test_vision_stage_with_defects_trains_the_tower_and_reports_defect_accuracy(tiny_base, warmup):
    size = tiny_base.model.config.vision_config.image_size
    patch = tiny_base.model.config.vision_config.patch_size
    tower = tiny_base.model.model.vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    llm_before = tiny_base.model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    stats = train_vision(tiny_base, build_pool(16, seed=5, size=size), steps=2, batch_size=4, lr=1e-2, seed=0,
                         defects=build_defect_pool(16, seed=6, patch_size=patch, size=size), defect_batch=4,
                         defect_weight=2.0, defect_warmup_steps=warmup)
    assert stats["steps"] == 2 and 0.0 <= stats["acc_defect"] <= 1.0 and stats["loss_defect"] > 0
    assert "acc_part" in stats  # the attribute heads joined after the defect-only warm-up
    assert any(not torch.equal(v, tower.state_dict()[k]) for k, v in before.items())
    assert torch.equal(llm_before, tiny_base.model.model.language_model.layers[0].mlp.up_proj.weight)
    assert all(not p.requires_grad for p in tower.parameters())
