"""bench/batch_generate.py: runs end to end on the committed base and reports what it claims."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from service.model.generate import ImageFeatureCache, RunningBatch
from tests.helpers import load_bench_script


def _module():
    return load_bench_script("batch_generate")


def test_batch_generate_reports_both_runs_and_a_speed_up(monkeypatch, capsys):
    module = _module()
    monkeypatch.setattr(sys, "argv", ["batch_generate.py", "--batch", "4", "--repeats", "1", "--max-new-tokens", "3"])
    module.main()
    out = capsys.readouterr().out
    assert "4 requests" in out
    rows = re.findall(r"^\| (each request alone|one batch of 4) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["each request alone", "one batch of 4"]
    for _, total, prefill, decode, gflops in rows:
        assert float(total) >= float(prefill) + float(decode) - 0.01 and int(gflops) > 0
    assert re.search(r"peak on this machine \(float32, 2048x2048\): \d+ GFLOP/s", out)
    assert re.search(r"batching speed-up in the model alone: [\d.]+x", out)


def test_llm_linear_parameters_are_the_decoder_layers_weights(tiny_base):
    """Attention and MLP weights of every LLM layer; not the vision tower, projector or LM head."""
    c = tiny_base.model.config.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q_out, kv_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (2 * q_out + 2 * kv_out) + 3 * c.hidden_size * c.intermediate_size
    assert _module().llm_linear_parameters(tiny_base) == c.num_hidden_layers * per_layer


@pytest.mark.parametrize(
    ("operator", "kind"),
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::bmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::scaled_dot_product_attention", "attention"),
        ("aten::mul", "other"),
        ("aten::matmul", "other"),  # a wrapper: its time is its mm's, counted there
        ("aten::copy_", "other"),
    ],
)
def test_operator_kinds(operator, kind):
    assert _module().operator_kind(operator) == kind


def test_profile_splits_each_run_by_operator_kind(monkeypatch, capsys):
    module = _module()
    monkeypatch.setattr(sys, "argv", ["batch_generate.py", "--batch", "4", "--repeats", "1", "--max-new-tokens", "3", "--profile"])
    module.main()
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (each request alone|one batch of 4) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["each request alone", "one batch of 4"]
    assert all(float(matmul) > 0 and float(attention) > 0 and float(other) > 0 for _, matmul, attention, other in rows)
    bound = re.search(r"operators were free: ([\d.]+)x \(each request alone ([\d.]+) ms, batched matmuls ([\d.]+) ms", out)
    assert bound and float(bound[1]) == pytest.approx(float(bound[2]) / float(bound[3]), abs=0.02)


def test_prefill_forward_is_the_generators_prefill(tiny_base):
    """What --compile times is the same prompt pass generation runs: same next-token logits per row."""
    module = _module()
    requests = module.requests_like_the_load_test(tiny_base, 4, 2, 4, 3)
    cache = ImageFeatureCache()
    hidden = module.prefill_forward(tiny_base, requests, cache, tiny_base.model.model.language_model)().last_hidden_state
    logits = tiny_base.model.lm_head(hidden[:, -1])
    expected = RunningBatch.prefill(tiny_base, requests, cache=cache).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert len({r.slot for r in requests}) > 1  # rows on the base and on adapters
