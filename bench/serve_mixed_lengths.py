"""Short answers among long ones: how long a short request waits behind long answers, per engine.

Continuous batching (rows join a running batch between decode steps, and leave it as they
finish) against the earlier engine, which only formed a new batch once the running one had ended,
can only be told apart when answers differ in length. The demo base stops at EOS after a few
tokens, so this benchmark serves a base of the demo base's sizes with random weights (preset
``demo-shape``: 144 image tokens, 4 Llama layers of width 256), on which every answer runs to its
``max_new_tokens``. Each of ``--clients`` clients sends requests one after another, every
``--long-every``-th of them long (``--long-tokens``), the rest short (``--short-tokens``), half
on the base and half spread over random adapters.

Servers are ``LABEL=ARGS`` (arguments for ``python -m service serve``) and may run another
checkout: ``--tree LABEL=PATH`` (e.g. ``git worktree add /tmp/before <commit>``). All run at once
(the idle ones sleep), each round visits every server, and the order reverses every other round.
Reported per server: median throughput (requests and generated tokens per second) and pooled
p50 / p95 latency of short and of long requests, and each server's medians relative to the first.

    python bench/serve_mixed_lengths.py --server "continuous=" --server "before=" --tree before=/tmp/before \\
        [--clients 8] [--requests-per-client 8] [--rounds 4] [--short-tokens 4] [--long-tokens 64] [--long-every 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import Server, make_adapters, measured, percentile, request_adapter, request_number, world_images  # noqa: E402
from bench.serve_variants import parse_server, parse_tree, server_command, server_labels  # noqa: E402

SHORT_QUESTION, LONG_QUESTION = "What colour is the part?", "Describe the part and any defect on it."


def mixed_bodies(clients: int, per_client: int, adapters: list[str], images: list[str], short_tokens: int,
                 long_tokens: int, long_every: int) -> list[list[tuple[bool, bytes]]]:
    """Per client, its requests as ``(is_long, JSON body)``; client ``c`` starts at a different offset
    in the long/short pattern, so long requests are spread over time rather than sent together."""
    out = []
    for c in range(clients):
        mine = []
        for k in range(per_client):
            i = request_number(c, k, clients)
            is_long = (k + c) % long_every == 0
            adapter = request_adapter(i, adapters)
            body = {"instruction": LONG_QUESTION if is_long else SHORT_QUESTION, "images": [images[i % len(images)]],
                    "max_new_tokens": long_tokens if is_long else short_tokens, "adapter": adapter}
            mine.append((is_long, json.dumps(body).encode()))
        out.append(mine)
    return out


def run_mixed(url: str, bodies: list[list[tuple[bool, bytes]]]) -> dict:
    """Every client on one keep-alive connection; latencies split by request class."""
    host, port = urlsplit(url).hostname, urlsplit(url).port

    def client(mine: list[tuple[bool, bytes]]) -> list[tuple[bool, float, int]]:
        done = []
        connection = http.client.HTTPConnection(host, port, timeout=600)
        try:
            for is_long, body in mine:
                t = time.perf_counter()
                connection.request("POST", "/v1/answer", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
                if response.status != 200:
                    raise RuntimeError(f"/v1/answer answered {response.status}: {payload[:200]!r}")
                done.append((is_long, time.perf_counter() - t, json.loads(payload)["usage"]["completion_tokens"]))
        finally:
            connection.close()
        return done

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        done = [x for xs in pool.map(client, bodies) for x in xs]
    wall = time.perf_counter() - started
    return {
        "rps": len(done) / wall,
        "tokens_per_s": sum(tokens for _, _, tokens in done) / wall,
        "latencies": [latency for _, latency, _ in done],
        "short": [latency for is_long, latency, _ in done if not is_long],
        "long": [latency for is_long, latency, _ in done if is_long],
        "short_tokens": [tokens for is_long, _, tokens in done if not is_long],
        "long_tokens": [tokens for is_long, _, tokens in done if is_long],
    }


def build_model(directory: Path) -> Path:
    from service.model.presets import build_random_base

    return build_random_base(directory, "demo-shape", seed=0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", type=parse_server, action="append", required=True, help="LABEL=ARGS (repeat)")
    parser.add_argument("--tree", type=parse_tree, action="append", default=[],
                        help="LABEL=PATH: run that server from another checkout (default: this one)")
    parser.add_argument("--model", type=Path, default=None, help="default: a random base of preset demo-shape")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=64)
    parser.add_argument("--long-every", type=int, default=4)
    args = parser.parse_args(argv)
    labels, trees = server_labels(parser, args.server, args.tree)
    logging.basicConfig(level=logging.ERROR)

    runs: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp) / "model")
        store = Path(tmp) / "adapters"
        adapters = make_adapters(model, store, args.adapters, args.rank)
        images = world_images(32)
        bodies = mixed_bodies(args.clients, args.requests_per_client, adapters, images, args.short_tokens,
                              args.long_tokens, args.long_every)
        warm_up = mixed_bodies(2, 2, adapters, images, 2, 2, 2)
        servers: dict[str, Server] = {}
        try:
            for i, (label, extra, env) in enumerate(args.server):
                servers[label] = Server(model, store, Path(tmp) / f"data-{i}", 16, 10.0, "auto", tuple(extra),
                                        tree=trees.get(label, ROOT), env=env)
                run_mixed(servers[label].url, warm_up)  # loads the adapters
            for round_ in range(args.rounds):
                for label in labels if round_ % 2 == 0 else reversed(labels):
                    runs[label].append(measured(servers[label], lambda url: run_mixed(url, bodies)))
        finally:
            for server in servers.values():
                server.close()

    summary = {}
    for label, rs in runs.items():
        short = [x for r in rs for x in r["short"]]
        long = [x for r in rs for x in r["long"]]
        summary[label] = {
            "rps": statistics.median(r["rps"] for r in rs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "short_p50_ms": percentile(short, 0.5) * 1e3, "short_p95_ms": percentile(short, 0.95) * 1e3,
            "long_p50_ms": percentile(long, 0.5) * 1e3, "long_p95_ms": percentile(long, 0.95) * 1e3,
            "short_tokens": statistics.mean(x for r in rs for x in r["short_tokens"]),
            "long_tokens": statistics.mean(x for r in rs for x in r["long_tokens"]),
            "server_cpu_ms": statistics.median(r["server_cpu_ms"] for r in rs),
        }
    print(f"# serve mixed lengths: {'given model' if args.model else 'random demo-shape base'}, {args.clients} clients x "
          f"{args.requests_per_client} requests, every {args.long_every}th long ({args.long_tokens} tokens, else "
          f"{args.short_tokens}), {args.adapters} adapters + base, {args.rounds} rounds, {platform.machine()} "
          f"{os.cpu_count()} cores\n")
    for label, extra, env in args.server:
        print(f"- {label}: {server_command(extra, env)} (tree: {trees.get(label, ROOT)})")
    print("\n| server | req/s | tokens/s | short p50 ms | short p95 ms | long p50 ms | long p95 ms | "
          "answer tokens short / long | server CPU ms/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for label, s in summary.items():
        print(f"| {label} | {s['rps']:.2f} | {s['tokens_per_s']:.0f} | {s['short_p50_ms']:.0f} | {s['short_p95_ms']:.0f} | "
              f"{s['long_p50_ms']:.0f} | {s['long_p95_ms']:.0f} | {s['short_tokens']:.1f} / {s['long_tokens']:.1f} | "
              f"{s['server_cpu_ms']:.1f} |")
    first = labels[0]
    for label in labels[1:]:
        a, b = summary[first], summary[label]
        print(f"\n{first} / {label}: throughput {a['rps'] / b['rps']:.2f}x, short p50 latency "
              f"{a['short_p50_ms'] / b['short_p50_ms']:.2f}x, long p50 latency {a['long_p50_ms'] / b['long_p50_ms']:.2f}x")
    return summary


if __name__ == "__main__":
    main()
