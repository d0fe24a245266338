"""The demo recipe's vision stage: the per-patch defect head, its labels and its data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from service.demo.data import build_defect_pool, build_pool
from service.demo.train_base import (
    DefectHead,
    DefectSummaryHead,
    found_by_type,
    parse_class_weights,
    train_vision,
)
from service.world import DEFECT_TYPES, GRID_CELLS, cell_of, generate_examples


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


def test_defect_pool_labels_the_cell_the_answer_names():
    pool = build_defect_pool(40, seed=3, patch_size=8, size=96)
    examples = generate_examples(40, 3, kind="inspection", size=96)
    for i, (_, record) in enumerate(examples):
        scene_defect = record["meta"]["scene"]["defect"]
        if scene_defect is None:
            assert pool.cell[i] == -1 and record["answer"] == "ok"
        else:  # the location the inspection answer states
            cell = GRID_CELLS[int(pool.cell[i])]
            assert cell == cell_of(scene_defect["x"], scene_defect["y"]) and record["answer"].endswith(cell)


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
    head = DefectHead(8)  # default rule: the defect patch weighs HW / 4, no image-level term
    assert math.isclose(head.loss(logits, defect, patch).item(), total / weights, rel_tol=1e-5)
    # with 16 patches the one defect patch weighs 16 / 4 = 4 against 1 for each of the other 15
    logits = torch.zeros(1, 16, 1 + len(DEFECT_TYPES))
    logits[0, 5, 0] = 5.0  # confident "none" on the defect patch: the miss costs 4x
    per_patch = F.cross_entropy(logits[0], torch.tensor([2 if n == 5 else 0 for n in range(16)]), reduction="none")
    expected = (per_patch.sum() + 3 * per_patch[5]) / (15 + 4)
    assert math.isclose(head.loss(logits, torch.tensor([2]), torch.tensor([5])).item(), expected.item(),
                        rel_tol=1e-5)
    # an explicit patch weight replaces HW / 4
    expected = (per_patch.sum() + 8 * per_patch[5]) / (15 + 9)
    assert math.isclose(DefectHead(8, patch_weight=9.0).loss(logits, torch.tensor([2]), torch.tensor([5])).item(),
                        expected.item(), rel_tol=1e-5)


def test_image_score_is_a_log_mean_exp_of_patch_log_odds():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 1 + len(DEFECT_TYPES), dtype=torch.float64)
    for b in range(3):  # by hand: odds of "some defect" per patch, averaged over patches, as log-odds
        odds = [logits[b, n, 1:].exp().sum() / logits[b, n, 0].exp() for n in range(5)]
        assert math.isclose(DefectHead.image_score(logits)[b].item(), math.log(sum(odds) / 5), rel_tol=1e-9)


def test_image_term_adds_a_defective_or_ok_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(4, 6, 1 + len(DEFECT_TYPES))
    defect, patch = torch.tensor([0, 2, 0, 5]), torch.tensor([-1, 3, -1, 0])
    plain = DefectHead(8, patch_weight=2.0).loss(logits, defect, patch)
    with_image = DefectHead(8, patch_weight=2.0, image_weight=0.5).loss(logits, defect, patch)
    truth = torch.tensor([0.0, 1.0, 0.0, 1.0])
    probability = torch.sigmoid(DefectHead.image_score(logits))
    bce = -(truth * probability.log() + (1 - truth) * (1 - probability).log()).mean()
    assert math.isclose((with_image - plain).item(), 0.5 * bce.item(), rel_tol=1e-5)
    # with the image term the call is the image-level score, not "any patch above 0.5"
    head = DefectHead(8, image_weight=1.0)
    assert torch.equal(head.image_presence(logits), DefectHead.image_score(logits) > 0)


def test_image_presence_is_any_patch_more_likely_defective():
    none = torch.tensor([4.0, 0, 0, 0, 0, 0])
    some = torch.tensor([0.0, 4, 0, 0, 0, 0])
    logits = torch.stack([torch.stack([none, none, none]), torch.stack([none, some, none])])
    assert DefectHead(8).image_presence(logits).tolist() == [False, True]


def test_summary_loss_is_every_tokens_cross_entropy_against_the_image_label():
    torch.manual_seed(3)
    head = DefectSummaryHead(8)
    tokens = torch.randn(2, 5, 8)
    type_logits, cell_logits = head(tokens)
    assert type_logits.shape == (2, 5, 1 + len(DEFECT_TYPES)) and cell_logits.shape == (2, 5, len(GRID_CELLS))
    defect, cell = torch.tensor([2, 0]), torch.tensor([7, -1])
    # by hand: all 10 tokens against their image's type; the 5 tokens of the defective image against cell 7
    type_term = sum(F.cross_entropy(type_logits[b, n][None], defect[b][None]) for b in range(2) for n in range(5)) / 10
    cell_term = sum(F.cross_entropy(cell_logits[0, n][None], torch.tensor([7])) for n in range(5)) / 5
    torch.testing.assert_close(head.loss((type_logits, cell_logits), defect, cell), type_term + cell_term)
    # no defective image in the batch: the type term alone (no NaN from an empty cell term)
    ok = torch.tensor([0, 0])
    torch.testing.assert_close(head.loss((type_logits, cell_logits), ok, torch.tensor([-1, -1])),
                               F.cross_entropy(type_logits.flatten(0, 1), torch.zeros(10, dtype=torch.long)))


def test_summary_exact_needs_the_type_and_for_a_defect_the_cell():
    type_logits = torch.zeros(3, 4, 1 + len(DEFECT_TYPES))
    cell_logits = torch.zeros(3, 4, len(GRID_CELLS))
    type_logits[0, :, 0] = 1.0  # image 0 says "none"
    type_logits[1, :, 3] = 1.0  # image 1 says type 3 ...
    cell_logits[1, :, 4] = 1.0  # ... in cell 4
    type_logits[2, :, 3] = 1.0  # image 2 says type 3 in cell 4 on average: one token votes 8, three vote 4
    cell_logits[2, 0, 8] = 2.0
    cell_logits[2, 1:, 4] = 1.0
    logits = (type_logits, cell_logits)
    assert DefectSummaryHead.exact(logits, torch.tensor([0, 3, 3]), torch.tensor([-1, 4, 4])).tolist() == [True] * 3
    assert DefectSummaryHead.exact(logits, torch.tensor([1, 3, 3]), torch.tensor([0, 5, 8])).tolist() == [False] * 3


def test_class_weights_parse_by_type_name():
    weight = parse_class_weights("chip=4, scratch=2")
    expected = torch.ones(1 + len(DEFECT_TYPES))
    expected[1 + DEFECT_TYPES.index("chip")] = 4.0
    expected[1 + DEFECT_TYPES.index("scratch")] = 2.0
    assert torch.equal(weight, expected)
    assert parse_class_weights("") is None and parse_class_weights(None) is None


@pytest.mark.parametrize("spec", ["dent=2", "chip", "chip=0", "chip=-1", "chip=x", "chip=nan", "chip=inf", "none=2"])
def test_class_weights_refuse_unknown_types_and_bad_weights(spec):
    with pytest.raises(ValueError):
        parse_class_weights(spec)


def test_class_weights_scale_the_defect_patch_and_image_terms_by_type():
    torch.manual_seed(4)
    logits = torch.randn(3, 4, 1 + len(DEFECT_TYPES))
    defect, patch = torch.tensor([2, 0, 5]), torch.tensor([1, -1, 3])
    class_weight = torch.tensor([1.0, 1, 3, 1, 1, 5])
    # by hand: patch weight 2 on a defect patch, times its type's weight; "none" patches weigh 1
    total = weights = 0.0
    for b in range(3):
        for n in range(4):
            target = int(defect[b]) if n == int(patch[b]) else 0
            w = 2.0 * float(class_weight[target]) if target else 1.0
            total += w * F.cross_entropy(logits[b, n][None], torch.tensor([target])).item()
            weights += w
    head = DefectHead(8, patch_weight=2.0, class_weight=class_weight)
    assert math.isclose(head.loss(logits, defect, patch).item(), total / weights, rel_tol=1e-5)
    # the image term: each image's binary cross-entropy weighted by its type (ok images by "none")
    with_image = DefectHead(8, patch_weight=2.0, image_weight=1.0, class_weight=class_weight)
    bce = F.binary_cross_entropy_with_logits(DefectHead.image_score(logits), (defect > 0).float(), reduction="none")
    image_w = torch.tensor([3.0, 1.0, 5.0])
    expected = total / weights + ((bce * image_w).sum() / image_w.sum()).item()
    assert math.isclose(with_image.loss(logits, defect, patch).item(), expected, rel_tol=1e-5)
    # all-ones weights are the unweighted loss
    plain = DefectHead(8, patch_weight=2.0, image_weight=1.0)
    ones = DefectHead(8, patch_weight=2.0, image_weight=1.0, class_weight=torch.ones(1 + len(DEFECT_TYPES)))
    torch.testing.assert_close(ones.loss(logits, defect, patch), plain.loss(logits, defect, patch))


def test_class_weights_scale_the_summary_terms_by_type():
    torch.manual_seed(5)
    class_weight = torch.tensor([1.0, 2, 1, 1, 1, 4])
    head = DefectSummaryHead(8, class_weight)
    type_logits, cell_logits = head(torch.randn(3, 5, 8))
    defect, cell = torch.tensor([1, 0, 5]), torch.tensor([2, -1, 6])
    # by hand: a weighted mean over all 15 tokens of the type term, over the 10 defective tokens of the cell term
    w = [float(class_weight[d]) for d in defect]
    type_term = sum(w[b] * F.cross_entropy(type_logits[b, n][None], defect[b][None]) for b in range(3)
                    for n in range(5)) / (5 * sum(w))
    cell_term = sum(w[b] * F.cross_entropy(cell_logits[b, n][None], cell[b][None]) for b in (0, 2)
                    for n in range(5)) / (5 * (w[0] + w[2]))
    torch.testing.assert_close(head.loss((type_logits, cell_logits), defect, cell), type_term + cell_term)


def test_found_by_type_is_recall_per_type_present():
    called = torch.tensor([True, False, True, True, False])
    defect = torch.tensor([5, 5, 1, 0, 0])  # two chips (one found), one scratch (found), two good parts
    assert found_by_type(called, defect) == {"found_scratch": 1.0, "found_chip": 0.5}


def test_vision_stage_with_class_weights_reports_recall_per_type(tiny_base):
    size = tiny_base.model.config.vision_config.image_size
    patch = tiny_base.model.config.vision_config.patch_size
    pool, defects = build_pool(16, seed=5, size=size), build_defect_pool(24, seed=6, patch_size=patch, size=size)
    stats = train_vision(tiny_base, pool, steps=2, batch_size=4, lr=1e-2, seed=0, defects=defects, defect_batch=24,
                         distill_weight=1.0, summary_weight=1.0, class_weight=parse_class_weights("chip=4"))
    present = {DEFECT_TYPES[int(d) - 1] for d in defects.defect if d > 0}
    assert present and all(0.0 <= stats[f"found_{name}"] <= 1.0 for name in present)


def test_vision_stage_with_a_summary_head_reports_its_accuracy(tiny_base):
    size = tiny_base.model.config.vision_config.image_size
    patch = tiny_base.model.config.vision_config.patch_size
    pool, defects = build_pool(16, seed=5, size=size), build_defect_pool(16, seed=6, patch_size=patch, size=size)
    initial = {k: v.clone() for k, v in tiny_base.model.model.vision_tower.state_dict().items()}
    stats = train_vision(tiny_base, pool, steps=2, batch_size=4, lr=1e-2, seed=0, defects=defects, defect_batch=4,
                         distill_weight=1.0, summary_weight=1.0)
    assert 0.0 <= stats["acc_summary"] <= 1.0
    with_summary = {k: v.clone() for k, v in tiny_base.model.model.vision_tower.state_dict().items()}
    tiny_base.model.model.vision_tower.load_state_dict(initial)
    stats = train_vision(tiny_base, pool, steps=2, batch_size=4, lr=1e-2, seed=0, defects=defects, defect_batch=4,
                         distill_weight=1.0)
    assert "acc_summary" not in stats
    # the summary term's gradient moved the tower somewhere else than the same run without it
    after = tiny_base.model.model.vision_tower.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in with_summary.items())


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


def test_distilled_vision_stage_trains_the_defect_head_without_attribute_heads(tiny_base):
    """``distill_weight``: no attribute heads; the general scenes pull every VCE-read layer back."""
    size = tiny_base.model.config.vision_config.image_size
    patch = tiny_base.model.config.vision_config.patch_size
    tower = tiny_base.model.model.vision_tower
    stats = train_vision(tiny_base, build_pool(16, seed=5, size=size), steps=3, batch_size=4, lr=1e-2, seed=0,
                         defects=build_defect_pool(16, seed=6, patch_size=patch, size=size), defect_batch=4,
                         defect_patch_weight=3.0, defect_image_weight=1.0, distill_weight=1.0)
    assert stats["steps"] == 3 and "distill" in stats and "acc_defect" in stats
    assert not any(k.startswith("acc_part") for k in stats)  # no attribute heads in this mode
    assert stats["distill"] > 0  # the tower moved, and the distillation term measured it
    assert all(not p.requires_grad for p in tower.parameters())


def test_distillation_weight_holds_the_features_the_vce_reads(tiny_base):
    """The same defect training drifts the VCE-read layers far less with a strong distillation weight."""
    from service.demo.data import normalise
    from service.demo.train_base import vce_hidden_states

    size = tiny_base.model.config.vision_config.image_size
    patch = tiny_base.model.config.vision_config.patch_size
    tower = tiny_base.model.model.vision_tower
    layers = list(tiny_base.vce_config.feature_layers)
    pool, defects = build_pool(16, seed=5, size=size), build_defect_pool(16, seed=6, patch_size=patch, size=size)
    pixels = normalise(pool.pixels, tiny_base.image_processor.image_mean, tiny_base.image_processor.image_std)
    initial = {k: v.clone() for k, v in tower.state_dict().items()}
    with torch.no_grad():
        start = vce_hidden_states(tower, pixels, layers)
    drift = {}
    for weight in (1e-3, 100.0):
        tower.load_state_dict(initial)
        train_vision(tiny_base, pool, steps=6, batch_size=16, lr=3e-3, seed=0, defects=defects, defect_batch=8,
                     defect_weight=5.0, distill_weight=weight)
        with torch.no_grad():
            after = vce_hidden_states(tower, pixels, layers)
        drift[weight] = sum(F.mse_loss(a, b).item() for a, b in zip(after, start, strict=True))
    tower.load_state_dict(initial)
    assert drift[100.0] < 0.5 * drift[1e-3], drift
