"""bench/engine_policies.py end to end on the tiny base: two join policies, in-process."""

from __future__ import annotations

import re

import pytest

from tests.helpers import load_bench_script


def test_engine_policies_reports_every_policy(tiny_base_dir, capsys):
    module = load_bench_script("engine_policies")
    summary = module.main(["--model", str(tiny_base_dir), "--policy", "default=1,8", "--policy", "one-batch=100,10000",
                           "--clients", "3", "--requests-per-client", "2", "--rounds", "2", "--adapters", "1",
                           "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\w-]+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| ([\d., ]+) \| ([\d.]+) \|$", out, re.M)
    assert [(r[0], r[1], r[2]) for r in rows] == [("default", "1", "8"), ("one-batch", "100", "10000")]
    for label, s in summary.items():
        assert s["rps"] > 0 and 1 <= s["batch_size"] <= 3, (label, s)


@pytest.mark.parametrize("spec", ["x=1", "x=a,b", "=1,8", "x"])
def test_a_policy_needs_a_label_a_ratio_and_a_step_bound(spec):
    module = load_bench_script("engine_policies")
    with pytest.raises(Exception, match="LABEL=JOIN_RATIO,MAX_JOIN_STEPS"):
        module.parse_policy(spec)
