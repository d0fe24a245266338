"""bench/serving_forward.py: runs on the committed base, both forwards agree, and it reports them."""

from __future__ import annotations

import re
import sys

from tests.helpers import load_bench_script


def test_serving_forward_reports_both_forwards_with_the_same_logits(monkeypatch, capsys):
    module = load_bench_script("serving_forward")
    monkeypatch.setattr(sys, "argv", ["serving_forward.py", "--rows", "1", "3", "--cached", "20", "--running", "3",
                                      "--joining", "4", "--positions", "6", "--rounds", "1"])
    module.main()
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.e+-]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["decode, 1 rows", "decode, 3 rows", "join, 3 running + 4 joining (24 real of 42)"]
    assert all(float(a) > 0 and float(b) > 0 and float(difference) == 0 for _, a, b, _, difference in rows)
