"""VCE: the grid_sample core against a per-point reference; identity when fresh; gradients flow."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from service.model.base import attach_vce
from service.model.vce import MultiLevelDeformableAttention, VCEConfig, VCEProjector, ms_deform_attn
from tests.model.reference import naive_ms_deform_attn


@pytest.mark.parametrize("height,width,levels,heads,points", [(3, 3, 2, 2, 2), (4, 4, 3, 1, 3), (2, 5, 1, 2, 4)])
def test_grid_sample_core_matches_naive_bilinear_reference(height, width, levels, heads, points):
    g = torch.Generator().manual_seed(0)
    b, q, d_head = 2, 5, 3
    values = torch.randn(b, levels, height * width, heads, d_head, dtype=torch.float64, generator=g)
    # Locations reach outside [0, 1] so zero padding at the borders is exercised too.
    locations = torch.rand(b, q, heads, levels, points, 2, dtype=torch.float64, generator=g) * 1.4 - 0.2
    weights = torch.rand(b, q, heads, levels, points, dtype=torch.float64, generator=g)
    got = ms_deform_attn(values, (height, width), locations, weights)
    want = naive_ms_deform_attn(values, (height, width), locations, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_official_layer_choice_and_parameter_count_for_clip_large():
    config = VCEConfig.for_depth(24)
    assert config.feature_layers == [-2, -8, -14, -20]
    attention = MultiLevelDeformableAttention(1024, config.n_levels, config.n_heads, config.n_points)
    n = sum(p.numel() for p in attention.parameters())
    assert 2.85e6 < n < 2.95e6  # the paper's 2.9M


def test_reference_layers_spread_over_shallower_towers():
    assert VCEConfig.for_depth(12).feature_layers == [-2, -5, -8, -11]
    assert VCEConfig.for_depth(4).feature_layers == [-2, -3, -4]


def _pixels(model, n=2, seed=0):
    size = model.config.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _inputs(model, pixels):
    n_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    image = model.config.image_token_id
    rows = [[1, 5, 6] + [image] * n_tokens + [7, 8, 9] for _ in range(pixels.shape[0])]
    return torch.tensor(rows)


def test_freshly_attached_vce_leaves_llava_logits_unchanged(tiny_base_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    pixels = _pixels(model)
    ids = _inputs(model, pixels)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
        attach_vce(model)
        after = model(input_ids=ids, pixel_values=pixels).logits
    assert isinstance(model.model.multi_modal_projector, VCEProjector)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_trained_vce_changes_features_and_all_its_parameters_get_gradients(tiny_base_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base_dir)
    projector = attach_vce(model)
    torch.nn.init.normal_(projector.attention.output_proj.weight, std=0.05)
    torch.nn.init.normal_(projector.attention.attention_weights.weight, std=0.05)
    torch.nn.init.normal_(projector.attention.sampling_offsets.weight, std=0.05)
    pixels = _pixels(model)
    out = model(input_ids=_inputs(model, pixels), pixel_values=pixels).logits
    out.square().mean().backward()
    for name, param in projector.named_parameters():
        if name.startswith("mlp."):
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_anchor_is_the_deepest_layer_not_the_shallowest():
    """Regression for the official code's list-order bug: the residual must carry layer -2."""
    dim, levels = 8, 3
    projector = VCEProjector(VCEConfig([-2, -3, -4], n_heads=2, n_points=2), dim, torch.nn.Identity())
    anchor = torch.randn(1, 4, dim)
    others = torch.randn(1, 4, (levels - 1) * dim)
    out = projector(torch.cat([anchor, others], dim=-1))
    torch.testing.assert_close(out, anchor)


def test_image_positions_start_as_identity_then_add_one_vector_per_patch():
    dim, out_dim, n_tokens = 8, 6, 4
    mlp = torch.nn.Linear(dim, out_dim)
    plain = VCEProjector(VCEConfig([-2, -3], n_heads=2, n_points=2), dim, mlp)
    config = VCEConfig([-2, -3], n_heads=2, n_points=2, image_positions=True)
    positioned = VCEProjector(config, dim, mlp, n_tokens=n_tokens, out_dim=out_dim)
    positioned.load_state_dict(plain.state_dict(), strict=False)
    features = torch.randn(3, n_tokens, 2 * dim)
    torch.testing.assert_close(positioned(features), plain(features), rtol=0, atol=0)
    with torch.no_grad():
        positioned.position_embedding.normal_()
    # reference: the plain projector's output plus row i of the embedding on token i, for every image
    torch.testing.assert_close(positioned(features), plain(features) + positioned.position_embedding[None])
    with pytest.raises(ValueError, match="position embeddings for 4"):
        positioned(torch.randn(1, 9, 2 * dim))


def test_image_positions_round_trip_through_the_base_directory(tiny_base_dir, tmp_path, caplog):
    import json
    import logging

    from service.model.base import load_base, save_base

    with caplog.at_level(logging.ERROR):
        base = load_base(tiny_base_dir, n_slots=0)
    assert base.projector.position_embedding is None and not base.vce_config.image_positions
    plain_fingerprint = base.fingerprint
    base.projector.add_image_positions(base.tokens_per_image, base.model.config.text_config.hidden_size)
    with torch.no_grad():
        base.projector.position_embedding.normal_()
    save_base(base, tmp_path / "positioned")
    assert json.loads((tmp_path / "positioned" / "vce_config.json").read_text())["image_positions"] is True
    loaded = load_base(tmp_path / "positioned", n_slots=0)
    torch.testing.assert_close(loaded.projector.position_embedding, base.projector.position_embedding)
    assert loaded.fingerprint != plain_fingerprint
    pixels = torch.randn(2, 3, *([base.model.config.vision_config.image_size] * 2))
    torch.testing.assert_close(loaded.encode_images(pixels), base.encode_images(pixels))


def test_a_vce_config_written_before_image_positions_loads_without_them():
    old = {"feature_layers": [-2, -8], "n_heads": 16, "n_points": 4}
    assert VCEConfig.from_dict(old).image_positions is False


def test_position_embeddings_for_another_grid_are_refused_with_a_clear_error(tiny_base_dir, tmp_path, caplog):
    import logging

    from safetensors.torch import load_file, save_file

    from service.model.base import BaseModelError, load_base, save_base

    with caplog.at_level(logging.ERROR):
        base = load_base(tiny_base_dir, n_slots=0)
    base.projector.add_image_positions(base.tokens_per_image, base.model.config.text_config.hidden_size)
    save_base(base, tmp_path / "positioned")
    weights = tmp_path / "positioned" / "vce.safetensors"
    state = load_file(str(weights))
    state["position_embedding"] = torch.zeros(base.tokens_per_image + 1, state["position_embedding"].shape[1])
    save_file(state, str(weights))
    with pytest.raises(BaseModelError, match="does not fit this model"):
        load_base(tmp_path / "positioned", n_slots=0)
