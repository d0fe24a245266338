"""bench/serve_mixed_lengths.py end to end: two real servers, one run from an explicit checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


def test_mixed_lengths_reports_short_and_long_latency_per_server(tiny_base_dir, capsys):
    module = load_bench_script("serve_mixed_lengths")
    summary = module.main([
        "--model", str(tiny_base_dir), "--server", "a=--max-batch-size 8", "--server", "b=", "--tree", f"b={ROOT}",
        "--clients", "2", "--requests-per-client", "4", "--rounds", "2", "--adapters", "1",
        "--short-tokens", "2", "--long-tokens", "6", "--long-every", "2"])
    out = capsys.readouterr().out
    assert f"- b: python -m service serve  (tree: {ROOT})" in out
    rows = re.findall(r"^\| (a|b) \| ([\d.]+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) / ([\d.]+) \|", out, re.M)
    assert [r[0] for r in rows] == ["a", "b"]
    assert re.search(r"^a / b: throughput [\d.]+x, short p50 latency [\d.]+x, long p50 latency [\d.]+x$", out, re.M)
    for s in summary.values():
        assert s["rps"] > 0 and s["short_p50_ms"] > 0 and s["long_p95_ms"] >= s["long_p50_ms"]
        assert 0 < s["short_tokens"] <= 3 and 0 < s["long_tokens"] <= 7  # a stop at EOS counts one token


def test_mixed_bodies_interleave_long_requests_across_clients():
    module = load_bench_script("serve_mixed_lengths")
    bodies = module.mixed_bodies(4, 4, ["x"], ["img"], 4, 64, 4)
    assert [[is_long for is_long, _ in mine] for mine in bodies] == [
        [True, False, False, False], [False, False, False, True], [False, False, True, False], [False, True, False, False]]


@pytest.mark.parametrize("spec", ["b", "b=/nonexistent"])
def test_a_tree_must_be_a_checkout(spec):
    module = load_bench_script("serve_mixed_lengths")
    with pytest.raises(Exception, match="LABEL=PATH|not a checkout"):
        module.parse_tree(spec)
