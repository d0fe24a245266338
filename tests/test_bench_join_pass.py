"""bench/join_pass.py: runs on the committed base, the three variants agree, and it reports them."""

from __future__ import annotations

import re
import sys

from tests.helpers import load_bench_script


def test_join_pass_reports_the_three_variants_with_the_same_logits(monkeypatch, capsys):
    module = load_bench_script("join_pass")
    real = module.join_layout(3, 4, 5)
    assert real[:3].tolist() == [[0, 0, 0, 0, 1]] * 3 and real[3:].sum(1).tolist() == [5, 4, 3, 5]
    monkeypatch.setattr(sys, "argv", ["join_pass.py", "--running", "12", "--joining", "3", "--positions", "6",
                                      "--cached", "20", "--pairs", "1"])
    module.main()
    out = capsys.readouterr().out
    assert re.search(r"12 running rows \+ 3 joining, 6 positions \(27 real of 90\)", out)
    rows = re.findall(r"^\| (padded|packed|packed\+split) \| ([\d.]+) \| ([\d.e+-]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["padded", "packed", "packed+split"]
    assert all(float(ms) > 0 and float(difference) < 1e-4 for _, ms, difference in rows)
    assert re.search(r"speed-up over padded: packed [\d.]+x, packed\+split [\d.]+x", out)
