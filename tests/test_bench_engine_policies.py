"""bench/engine_policies.py end to end on the tiny base: two join policies, in-process."""

from __future__ import annotations

import re

import pytest

from tests.helpers import load_bench_script


def test_engine_policies_reports_every_policy(tiny_base_dir, capsys, monkeypatch):
    module = load_bench_script("engine_policies")
    seen = []  # the policy in force at each run, and the engine that ran it
    run = module.closed_loop

    def recorded(engine, jobs):
        seen.append((engine.settings.join_ratio, engine.settings.max_join_steps, id(engine)))
        return run(engine, jobs)

    monkeypatch.setattr(module, "closed_loop", recorded)
    summary = module.main(["--model", str(tiny_base_dir), "--policy", "default=1,8", "--policy", "one-batch=100,10000",
                           "--clients", "3", "--requests-per-client", "2", "--rounds", "2", "--adapters", "1",
                           "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\w-]+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| ([\d., ]+) \| ([\d.]+) \|$", out, re.M)
    assert [(r[0], r[1], r[2]) for r in rows] == [("default", "1", "8"), ("one-batch", "100", "10000")]
    for label, s in summary.items():
        assert s["rps"] > 0 and 1 <= s["batch_size"] <= 3, (label, s)
    # one engine throughout; after the warm-up, each round visits both policies, in alternating order
    assert len({engine for *_, engine in seen}) == 1
    assert [policy for *policy, _ in seen[1:]] == [[1, 8], [100, 10000], [100, 10000], [1, 8]]


@pytest.mark.parametrize("spec", ["x=1", "x=a,b", "=1,8", "x"])
def test_a_policy_needs_a_label_a_ratio_and_a_step_bound(spec):
    module = load_bench_script("engine_policies")
    with pytest.raises(Exception, match="LABEL=JOIN_RATIO,MAX_JOIN_STEPS"):
        module.parse_policy(spec)
