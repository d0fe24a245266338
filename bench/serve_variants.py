"""Server variants side by side: the same load against differently configured servers, in rounds.

Where ``bench/serve_load.py`` compares dynamic batching with batch size 1, this compares any
server configurations (dtype, HTTP parser, event loop, batch size) and load generators, so that a
change to one of them is measured in one run on a noisy machine: every variant runs at once (the
idle ones sleep), each round visits every (server, load generator) pair, and the order reverses
every other round. Reported: median throughput, pooled p50, and CPU time per request of the server
and of the load generator (which shares the cores).

    python bench/serve_variants.py --server "f32=--dtype float32" --server "bf16=--dtype bfloat16" \\
        [--load-generator http.client --load-generator httpx] [--clients 1 16] [--rounds 4]

A server is ``LABEL=ARGS``: ARGS go to ``python -m service serve`` (``--dtype``, ``--http h11``,
``--loop asyncio``, ``--max-batch-size 1``, ...), after any leading ``NAME=VALUE`` words, which
set the server's environment as a shell would (``"passive=OMP_WAIT_POLICY=PASSIVE --dtype
bfloat16"``); every server batches up to 16 rows with a 10 ms
wait unless ARGS say otherwise. ``--tree LABEL=PATH`` runs that server from another checkout, e.g.
an engine before a change (``git worktree add /tmp/before <commit>``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import (  # noqa: E402
    QUESTIONS,
    Server,
    make_adapters,
    measure,
    percentile,
    request_adapter,
    request_number,
    run_load,
    world_images,
)
from service.config import DEFAULT_MODEL_DIR  # noqa: E402


def run_load_httpx(url: str, clients: int, per_client: int, adapters: list[str], images: list[str], max_new_tokens: int):
    """``run_load`` with one ``httpx.Client`` per client thread, bodies serialised per request."""
    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=300) as http:
            for k in range(per_client):
                i = request_number(c, k, clients)
                adapter = request_adapter(i, adapters)
                body = {"instruction": QUESTIONS[i % len(QUESTIONS)], "images": [images[i % len(images)]],
                        "max_new_tokens": max_new_tokens, "adapter": adapter}
                t = time.perf_counter()
                http.post(url + "/v1/answer", json=body).raise_for_status()
                latencies.append(time.perf_counter() - t)
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
    return {"rps": len(latencies) / (time.perf_counter() - started), "latencies": latencies}


LOAD_GENERATORS = {"http.client": run_load, "httpx": run_load_httpx}


ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def parse_server(text: str) -> tuple[str, list[str], dict[str, str]]:
    """``LABEL=[NAME=VALUE ...] ARGS`` → label, server arguments, environment (as a shell reads it)."""
    label, sep, args = text.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=ARGS, e.g. 'bf16=--dtype bfloat16'")
    words, env = shlex.split(args), {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return label, words, env


def server_command(extra: list[str], env: dict[str, str]) -> str:
    """How a server was started, as a shell line."""
    assignments = "".join(f"{name}={shlex.quote(value)} " for name, value in env.items())
    return f"{assignments}python -m service serve {shlex.join(extra)}"


def server_labels(parser: argparse.ArgumentParser, servers: list[tuple[str, list[str], dict[str, str]]],
                  trees: list[tuple[str, Path]]) -> tuple[list[str], dict[str, Path]]:
    """The servers' labels and ``{label: tree}``; exits with a usage error on a repeated label or a
    ``--tree`` for no server."""
    labels = [label for label, _, _ in servers]
    by_label = dict(trees)
    if len(set(labels)) != len(labels):
        parser.error("server labels must differ")
    if set(by_label) - set(labels):
        parser.error(f"--tree for unknown server(s): {', '.join(sorted(set(by_label) - set(labels)))}")
    return labels, by_label


def parse_tree(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=PATH")
    if not (Path(path) / "service" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"{path}: not a checkout of this project (no service/__main__.py)")
    return label, Path(path).resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--server", type=parse_server, action="append", required=True, help="LABEL=ARGS (repeat)")
    parser.add_argument("--tree", type=parse_tree, action="append", default=[],
                        help="LABEL=PATH: run that server from another checkout (default: this one)")
    parser.add_argument("--load-generator", choices=sorted(LOAD_GENERATORS), action="append",
                        help="repeat to compare (default: http.client)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-client", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    generators = args.load_generator or ["http.client"]
    labels, trees = server_labels(parser, args.server, args.tree)
    logging.basicConfig(level=logging.ERROR)

    runs: dict[tuple[int, str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        adapters = make_adapters(args.model, store, args.adapters, args.rank)
        images = world_images(32)
        servers: dict[str, Server] = {}
        try:
            for i, (label, extra, env) in enumerate(args.server):
                servers[label] = Server(args.model, store, Path(tmp) / f"data-{i}", 16, 10.0, "auto", tuple(extra),
                                        tree=trees.get(label, ROOT), env=env)
                run_load(servers[label].url, 2, 2, adapters, images, args.max_new_tokens)  # warm-up, loads adapters
            pairs = [(label, gen) for label in labels for gen in generators]
            for clients in args.clients:
                for round_ in range(args.rounds):
                    for label, gen in pairs if round_ % 2 == 0 else reversed(pairs):
                        runs.setdefault((clients, label, gen), []).append(measure(
                            servers[label], clients, args.requests_per_client, adapters, images, args.max_new_tokens,
                            LOAD_GENERATORS[gen]))
        finally:
            for server in servers.values():
                server.close()

    print(f"# serve variants: {args.model.name}, {args.adapters} adapters (rank {args.rank}) + base, "
          f"max_new_tokens {args.max_new_tokens}, {args.requests_per_client} requests per client, {args.rounds} rounds, "
          f"{platform.machine()} {os.cpu_count()} cores\n")
    for label, extra, env in args.server:
        print(f"- {label}: {server_command(extra, env)}" + (f" (tree: {trees[label]})" if label in trees else ""))
    print("\n| clients | server | load generator | throughput req/s (median) | rounds | p50 ms | server CPU ms/req | "
          "load generator CPU ms/req |")
    print("|---:|---|---|---:|---|---:|---:|---:|")
    for (clients, label, gen), rs in runs.items():
        latencies = [x for r in rs for x in r["latencies"]]
        per_round = ", ".join(f"{r['rps']:.1f}" for r in rs)
        print(f"| {clients} | {label} | {gen} | {statistics.median(r['rps'] for r in rs):.2f} | "
              f"{per_round} | {percentile(latencies, 0.5) * 1e3:.0f} | "
              f"{statistics.median(r['server_cpu_ms'] for r in rs):.1f} | {statistics.median(r['client_cpu_ms'] for r in rs):.1f} |")


if __name__ == "__main__":
    main()
