"""bench/serve_load.py end to end: two real servers, alternating rounds, and the table it prints."""

from __future__ import annotations

import json
import re
import sys

from tests.helpers import load_bench_script


def _module():
    return load_bench_script("serve_load")


def test_percentile_is_nearest_rank():
    percentile = _module().percentile
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(map(float, range(1, 101))), 0.95) == 95.0
    assert percentile([7.0], 0.95) == 7.0


def test_serve_load_measures_both_servers_in_rounds(monkeypatch, capsys):
    module = _module()
    monkeypatch.setattr(sys, "argv", ["serve_load.py", "--clients", "2", "--requests-per-client", "2", "--rounds", "2",
                                      "--adapters", "1", "--max-new-tokens", "2"])
    module.main()
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (dynamic batching \(max 16, 10 ms\)|batch size 1) \| 2 \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+) \| "
                      r"([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert sorted(r[0] for r in rows) == ["batch size 1", "dynamic batching (max 16, 10 ms)"]
    for _, n, rps, p50, p95, server_cpu, client_cpu in rows:
        assert int(n) == 2 * 2 * 2  # clients x requests x rounds, pooled
        assert float(rps) > 0 and int(p95) >= int(p50) > 0
        assert float(server_cpu) > 0 and float(client_cpu) > 0
    ratio = re.search(r"2 clients: dynamic batching / batch size 1 throughput = ([\d.]+)x \(rounds: ([\d., ]+)\)", out)
    assert ratio and len(ratio.group(2).split(", ")) == 2


def test_requests_in_flight_together_mix_base_adapters_and_images():
    """The k-th request of every client is in flight at once: that set must itself be the mix."""
    bodies = _module().request_bodies(16, 4, ["a0", "a1", "a2", "a3"], [f"img{i}" for i in range(32)], 8)
    assert [len(b) for b in bodies] == [4] * 16
    for k in range(4):
        step = [json.loads(bodies[c][k]) for c in range(16)]
        adapters = [r["adapter"] for r in step]
        assert adapters.count("base") == 8
        assert sorted(set(adapters) - {"base"}) == ["a0", "a1", "a2", "a3"]
        assert len({r["images"][0] for r in step}) == 16
    everything = [json.loads(b) for mine in bodies for b in mine]
    assert sum(r["adapter"] == "base" for r in everything) == len(everything) // 2


def test_fresh_images_are_new_to_every_run_and_shared_by_both_servers_in_a_run():
    pools = _module().image_pools([1, 4], 3, 2, fresh=True)
    runs = [(1, 0), (1, 1), (4, 0), (4, 1)]
    assert set(pools) == {"warm-up", *runs}
    assert [len(pools[r]) for r in runs] == [3, 3, 12, 12]
    everything = [im for key in ("warm-up", *runs) for im in pools[key]]
    assert len(set(everything)) == len(everything)  # no image twice, warm-up included
    # Each run's bodies then give every request its own image.
    bodies = _module().request_bodies(4, 3, ["a0"], pools[(4, 1)], 8)
    assert len({json.loads(b)["images"][0] for mine in bodies for b in mine}) == 12
    shared = _module().image_pools([16], 16, 3, fresh=False)
    assert len(shared["warm-up"]) == 32 and all(shared[(16, r)] is shared["warm-up"] for r in range(3))
