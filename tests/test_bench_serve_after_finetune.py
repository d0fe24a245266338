"""bench/serve_after_finetune.py end to end: a real server measured fresh, after an upload and after a fine-tune."""

from __future__ import annotations

import re

from tests.helpers import load_bench_script


def test_serve_after_finetune_measures_each_phase(monkeypatch, capsys):
    module = load_bench_script("serve_after_finetune")
    phases = module.main(["--requests", "2", "--rounds", "1", "--examples", "16", "--epochs", "1"])
    out = capsys.readouterr().out
    assert list(phases) == ["fresh server", "after an adapter upload", "after a fine-tune (succeeded)"]
    assert all(len(values) == 1 and values[0] > 0 for values in phases.values())
    rows = re.findall(r"^\| (fresh server|after [^|]+) \| ([\d.]+) \| ([\d.]+)x \|$", out, re.M)
    assert [r[0] for r in rows] == list(phases) and rows[0][2] == "1.00"
