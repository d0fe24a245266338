"""bench/engine_policies.py end to end on the tiny base: join policies and a batch-size-1 baseline, in-process."""

from __future__ import annotations

import re

import pytest

from tests.helpers import load_bench_script


def test_engine_policies_reports_every_policy(tiny_base_dir, capsys, monkeypatch):
    module = load_bench_script("engine_policies")
    seen = []  # the policy in force at each run, and the engine that ran it
    run = module.closed_loop

    def recorded(engine, jobs):
        s = engine.settings
        seen.append((s.join_ratio, s.max_join_steps, s.max_batch_size, id(engine)))
        return run(engine, jobs)

    monkeypatch.setattr(module, "closed_loop", recorded)
    summary = module.main(["--model", str(tiny_base_dir), "--policy", "default=1,8", "--policy", "one-batch=100,10000",
                           "--policy", "alone=1,8,1", "--baseline", "alone",
                           "--clients", "3", "--requests-per-client", "2", "--rounds", "2", "--adapters", "1",
                           "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\w-]+) \| ([\d.]+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d., ]+) \| ([\d.]+) \| ([\d.]+) \|$",
                      out, re.M)
    assert [r[:4] for r in rows] == [("default", "1", "8", "16"), ("one-batch", "100", "10000", "16"),
                                     ("alone", "1", "8", "1")]
    for label, s in summary.items():
        assert s["rps"] > 0 and 1 <= s["batch_size"] <= 3, (label, s)
        assert s["speedup"] == pytest.approx(s["rps"] / summary["alone"]["rps"])
    assert summary["alone"]["batch_size"] == 1  # one request per forward pass: the batch bound held
    assert [float(r[7]) for r in rows] == [round(summary[r[0]]["speedup"], 2) for r in rows]
    # one engine throughout; after the warm-up, each round visits every policy, in alternating order
    assert len({engine for *_, engine in seen}) == 1
    assert [policy for *policy, _ in seen[1:]] == [[1, 8, 16], [100, 10000, 16], [1, 8, 1],
                                                   [1, 8, 1], [100, 10000, 16], [1, 8, 16]]


def test_the_baseline_must_be_one_of_the_policies(tiny_base_dir):
    module = load_bench_script("engine_policies")
    with pytest.raises(SystemExit):
        module.main(["--model", str(tiny_base_dir), "--policy", "default=1,8", "--baseline", "alone"])


@pytest.mark.parametrize("spec", ["x=1", "x=a,b", "=1,8", "x", "x=1,8,a", "x=1,8,1,1", "x=1,8,0"])
def test_a_policy_needs_a_label_a_ratio_a_step_bound_and_at_most_a_batch_bound(spec):
    module = load_bench_script("engine_policies")
    with pytest.raises(Exception, match=r"LABEL=JOIN_RATIO,MAX_JOIN_STEPS\[,MAX_BATCH_SIZE\]|at least 1"):
        module.parse_policy(spec)


def test_a_policy_without_a_batch_bound_gets_the_servers_default():
    module = load_bench_script("engine_policies")
    assert module.parse_policy("d=1,8") == ("d", {"join_ratio": 1.0, "max_join_steps": 8, "max_batch_size": 16})
    assert module.parse_policy("alone=0.5,4,1")[1]["max_batch_size"] == 1
