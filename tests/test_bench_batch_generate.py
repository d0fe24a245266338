"""bench/batch_generate.py: runs end to end on the committed base and reports what it claims."""

from __future__ import annotations

import re
import sys

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
