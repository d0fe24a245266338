"""bench/serve_variants.py end to end: two differently configured real servers, both load generators."""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import load_bench_script


def test_serve_variants_measures_every_server_with_every_load_generator(monkeypatch, capsys):
    module = load_bench_script("serve_variants")
    monkeypatch.setattr(sys, "argv", [
        "serve_variants.py", "--server", "h11=--http h11 --loop asyncio", "--server", "default=OMP_NUM_THREADS=1 --dtype float32",
        "--load-generator", "http.client", "--load-generator", "httpx", "--clients", "2", "--requests-per-client", "2",
        "--rounds", "2", "--adapters", "1", "--max-new-tokens", "2"])
    module.main()
    out = capsys.readouterr().out
    assert "- h11: python -m service serve --http h11 --loop asyncio" in out
    assert "- default: OMP_NUM_THREADS=1 python -m service serve --dtype float32" in out
    rows = re.findall(r"^\| 2 \| (\w+) \| ([\w.]+) \| ([\d.]+) \| ([\d., ]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert sorted((r[0], r[1]) for r in rows) == [("default", "http.client"), ("default", "httpx"),
                                                   ("h11", "http.client"), ("h11", "httpx")]
    for _, _, rps, rounds, p50, server_cpu, client_cpu in rows:
        assert float(rps) > 0 and len(rounds.split(", ")) == 2 and int(p50) > 0
        assert float(server_cpu) > 0 and float(client_cpu) > 0


def test_a_server_spec_may_set_the_servers_environment_first():
    module = load_bench_script("serve_variants")
    label, args, env = module.parse_server("spin=GOMP_SPINCOUNT=3000 NOTE='a b' --dtype bfloat16 --port=1")
    assert (label, args, env) == ("spin", ["--dtype", "bfloat16", "--port=1"], {"GOMP_SPINCOUNT": "3000", "NOTE": "a b"})
    assert module.server_command(args, env) == "GOMP_SPINCOUNT=3000 NOTE='a b' python -m service serve --dtype bfloat16 --port=1"
    assert module.parse_server("plain=--dtype float32")[2] == {}


@pytest.mark.parametrize("spec", ["no-equals-sign", "=--dtype float32"])
def test_a_server_needs_a_label_and_arguments(spec):
    module = load_bench_script("serve_variants")
    with pytest.raises(Exception, match="LABEL=ARGS"):
        module.parse_server(spec)
