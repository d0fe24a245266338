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


def test_language_stage_with_a_defect_head_trains_the_projector_not_the_tower(tiny_base):
    from service.demo.data import build_defect_pool

    size = tiny_base.model.config.vision_config.image_size
    patch = tiny_base.model.config.vision_config.patch_size
    tower_before = {k: v.clone() for k, v in tiny_base.model.model.vision_tower.state_dict().items()}
    mlp_before = {k: v.clone() for k, v in tiny_base.projector.mlp.state_dict().items()}
    loss_with, _ = train_language(tiny_base, build_pool(8, seed=5, size=size), steps=1, batch_size=4, lr=0.0,
                                  seed=0, defects=build_defect_pool(8, seed=6, patch_size=patch, size=size),
                                  defect_batch=4, defect_weight=1.0)
    loss_without, _ = train_language(tiny_base, build_pool(8, seed=5, size=size), steps=1, batch_size=4, lr=0.0,
                                     seed=0)
    assert loss_with > loss_without > 0  # lr 0: same weights, so the difference is the defect term
    train_language(tiny_base, build_pool(8, seed=5, size=size), steps=2, batch_size=4, lr=1e-2, seed=0,
                   defects=build_defect_pool(8, seed=6, patch_size=patch, size=size), defect_batch=4)
    assert all(torch.equal(v, tiny_base.model.model.vision_tower.state_dict()[k]) for k, v in tower_before.items())
    assert any(not torch.equal(v, tiny_base.projector.mlp.state_dict()[k]) for k, v in mlp_before.items())
    assert all(not p.requires_grad for p in tiny_base.model.parameters())


def test_language_stage_summary_head_alone_adds_its_term(tiny_base):
    from service.demo.data import build_defect_pool

    size = tiny_base.model.config.vision_config.image_size
    patch = tiny_base.model.config.vision_config.patch_size
    pool, defects = build_pool(8, seed=5, size=size), build_defect_pool(8, seed=6, patch_size=patch, size=size)
    plain, _ = train_language(tiny_base, pool, steps=1, batch_size=4, lr=0.0, seed=0)
    with_summary, _ = train_language(tiny_base, pool, steps=1, batch_size=4, lr=0.0, seed=0, defects=defects,
                                     defect_batch=4, defect_weight=0.0, summary_weight=1.0)
    both, _ = train_language(tiny_base, pool, steps=1, batch_size=4, lr=0.0, seed=0, defects=defects,
                             defect_batch=4, defect_weight=1.0, summary_weight=1.0)
    # lr 0: same weights each time, so the differences are the heads' terms
    assert both > with_summary > plain > 0
    assert all(not p.requires_grad for p in tiny_base.model.parameters())


def test_position_head_loss_is_what_a_plain_row_and_column_cross_entropy_gives():
    from service.demo.train_base import PositionHead

    torch.manual_seed(0)
    head = PositionHead(dim=8, grid=3)
    tokens = torch.randn(2, 9, 8)
    logits = head.net(tokens)
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2] * 2)
    cols = torch.tensor([0, 1, 2] * 6)
    reference = (torch.nn.functional.cross_entropy(logits[..., :3].reshape(18, 3), rows)
                 + torch.nn.functional.cross_entropy(logits[..., 3:].reshape(18, 3), cols))
    torch.testing.assert_close(head.loss(tokens), reference)


def test_language_stage_trains_the_position_embedding_at_its_own_rate(tiny_base):
    size = tiny_base.model.config.vision_config.image_size
    projector = tiny_base.projector
    projector.add_image_positions(tiny_base.tokens_per_image, tiny_base.model.config.text_config.hidden_size)
    mlp_before = {k: v.clone() for k, v in projector.mlp.state_dict().items()}
    pool = build_pool(8, seed=5, size=size)
    loss_with, _ = train_language(tiny_base, pool, steps=1, batch_size=4, lr=0.0, seed=0, position_weight=1.0,
                                  position_lr=0.0)
    loss_without, _ = train_language(tiny_base, pool, steps=1, batch_size=4, lr=0.0, seed=0)
    assert loss_with > loss_without > 0  # lr 0: same weights, so the difference is the position term
    assert torch.count_nonzero(projector.position_embedding) == 0
    # the rest of the model frozen (lr 0); only the embedding moves, and it stays out of weight decay
    train_language(tiny_base, pool, steps=2, batch_size=4, lr=0.0, seed=0, position_weight=1.0, position_lr=1e-2)
    assert torch.count_nonzero(projector.position_embedding) > 0
    assert all(torch.equal(v, projector.mlp.state_dict()[k]) for k, v in mlp_before.items())
    assert all(not p.requires_grad for p in tiny_base.model.parameters())


def test_neutral_output_rows_moves_only_the_rows_no_answer_uses(tiny_base):
    from service.demo.train_base import neutral_output_rows

    head = tiny_base.model.get_output_embeddings().weight
    before = head.detach().clone()
    answers = ["red", "hex nut", "3", "red"]
    used = {tiny_base.tokenizer.eos_token_id}
    for answer in answers:
        used.update(tiny_base.tokenizer(tiny_base.prompt.answer_prefix + answer, add_special_tokens=False)["input_ids"])
    used = sorted(used)
    unused = [i for i in range(head.shape[0]) if i not in used]

    reset = neutral_output_rows(tiny_base, answers)

    assert reset == len(unused) > 0
    assert torch.equal(head[used], before[used])
    # by hand: centred on the used rows' mean, at the used rows' spread, each row keeping its own offset
    kept, moved = before[used], before[unused]
    rms = lambda rows: (rows - rows.mean(0)).pow(2).sum(-1).mean().sqrt()  # noqa: E731
    expected = kept.mean(0) + (moved - moved.mean(0)) * rms(kept) / rms(moved)
    assert torch.allclose(head[unused], expected, atol=1e-6)
    assert torch.allclose(head[unused].mean(0), kept.mean(0), atol=1e-5)
    assert torch.allclose(rms(head[unused]), rms(kept), rtol=1e-4)
    # so on average over hidden states an unused token's logit sits where the answer tokens' do,
    # and unused tokens stay distinguishable from each other
    hidden = torch.randn(64, head.shape[1])
    logits = hidden @ head.T
    assert torch.allclose(logits[:, unused].mean(-1), logits[:, used].mean(-1), atol=1e-4)
    assert not torch.allclose(logits[:, unused[0]], logits[:, unused[1]])


def test_neutral_output_rows_refuses_a_tied_head(tiny_base):
    from service.demo.train_base import neutral_output_rows

    tiny_base.model.get_output_embeddings().weight = tiny_base.model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied"):
        neutral_output_rows(tiny_base, ["red"])


def test_language_stage_of_zero_steps_changes_nothing(tiny_base):
    size = tiny_base.model.config.vision_config.image_size
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    loss, steps = train_language(tiny_base, build_pool(4, seed=5, size=size), steps=0, batch_size=4, lr=1e-2, seed=0)
    assert (loss, steps) == (0.0, 0)
    assert all(torch.equal(v, tiny_base.model.state_dict()[k]) for k, v in before.items())


def test_train_base_without_steps_only_neutralises_the_head(tiny_base_dir, tmp_path, monkeypatch):
    """``--vision-steps 0 --language-steps 0 --neutral-output-rows``: the head's unused rows move,
    every other weight stays, the card records it, and no close-up is rendered for nothing."""
    import json

    import service.demo.train_base as train_base
    from service.model.base import load_base

    def no_close_ups(*args, **kwargs):
        raise AssertionError("a command that trains nothing rendered close-ups")

    monkeypatch.setattr(train_base, "build_defect_pool", no_close_ups)
    out = tmp_path / "out"
    card = train_base.main(["--init-from", str(tiny_base_dir), "--out", str(out), "--pool", "8", "--vision-steps", "0",
                            "--language-steps", "0", "--neutral-output-rows", "--eval-n", "0", "--threads", "1"])

    assert card["recipe"]["neutral_output_rows"] is True and card["training"]["output_rows_reset"] > 0
    before, after = load_base(tiny_base_dir, n_slots=0), load_base(out, n_slots=0)
    head_before, head_after = before.model.lm_head.weight, after.model.lm_head.weight
    moved = ~torch.isclose(head_before, head_after, atol=2e-3).all(-1)  # float16 on disk
    assert int(moved.sum()) == card["training"]["output_rows_reset"]
    tower = after.model.model.vision_tower.state_dict()
    assert all(torch.allclose(v, tower[k], atol=2e-3) for k, v in before.model.model.vision_tower.state_dict().items())
    assert json.loads((out / "MODEL_CARD.json").read_text())["recipe"]["neutral_output_rows"] is True
