"""Load test of the running service: throughput and p50/p95 latency at 1, 4 and 16 clients.

Starts the real server (``python -m service serve``) twice on loopback — once with dynamic
batching (``--max-batch-size 16``) and once with batch size 1 — and drives each with N concurrent
clients, half on the base and half spread over several adapters, each sending a world image and a
question. The speed-up of dynamic batching is measured in the same run: both servers run at once
(the idle one sleeps), and each client count is measured ``--rounds`` times, alternating which
server goes first, so that a noisy machine slows both alike. Throughput is the median over
rounds, the speed-up the median of each round's ratio, latencies are pooled over rounds. CPU time
per request (server process, all threads; and this load generator, which shares the machine) is
read from ``/proc`` and ``getrusage``.

By default the requests draw on 32 images, each of which comes back (with the same adapter and
other questions), so the servers' image-feature and prefix caches hit; ``--fresh-images`` gives
every request an image no server has seen.

    python bench/serve_load.py [--model service/assets/demo-base] [--clients 1 4 16] [--requests-per-client 6] [--rounds 3] [--fresh-images]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import io
import json
import logging
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.config import DEFAULT_MODEL_DIR  # noqa: E402

QUESTIONS = ["Is this part defective? Where?", "What colour is the part?", "What part is this?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_adapter(base, rank: int, seed: int):
    """A random Dual-LoRA adapter for ``base``, with ``B`` nonzero so that it costs what a real one does
    (its answers are noise). Returns ``(config, weights)``."""
    import torch

    from service.model.lora import AdapterConfig

    config = AdapterConfig(r=rank, lora_alpha=2 * rank, base_model_fingerprint=base.fingerprint)
    adapter = base.slots.new_adapter(config, seed=seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return config, adapter


def make_adapters(model: Path, store: Path, n: int, rank: int) -> list[str]:
    """``n`` random adapters for the base, published in ``store`` as ``bench-<i>``."""
    from service.model.base import load_base
    from service.model.lora import save_adapter

    base = load_base(model, n_slots=1, max_rank=rank)
    names = []
    for i in range(n):
        config, adapter = random_adapter(base, rank, seed=i)
        save_adapter(store / f"bench-{i}" / "1", config, adapter)
        (store / f"bench-{i}" / "live").write_text("1\n")
        names.append(f"bench-{i}")
    return names


def world_images(n: int) -> list[str]:
    from service.world import generate_examples

    out = []
    for image, _ in generate_examples(n, seed=777, kind="inspection"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def image_pools(clients: list[int], per_client: int, rounds: int, fresh: bool) -> dict:
    """The images each (client count, round) sends, and the warm-up's (under ``"warm-up"``).

    By default every run draws on one pool of 32 images (after the first run, the servers' caches
    hold them all); with ``fresh``, every run gets images of its own, one per request, which both
    servers receive (each has its own caches) and no other run sees, nor the warm-up.
    """
    if not fresh:
        pool = world_images(32)
        return {"warm-up": pool, **{(c, r): pool for c in clients for r in range(rounds)}}
    runs = [(c, r) for c in clients for r in range(rounds)]
    pool = world_images(sum(c * per_client for c, _ in runs) + 4)
    pools, start = {"warm-up": pool[-4:]}, 0
    for c, r in runs:
        pools[(c, r)] = pool[start : start + c * per_client]
        start += c * per_client
    return pools


class Server:
    def __init__(self, model: Path, store: Path, data: Path, max_batch: int, max_wait_ms: float, dtype: str = "auto",
                 extra_args: tuple[str, ...] = (), tree: Path = ROOT, env: dict[str, str] | None = None):
        """``tree``: the checkout whose ``service`` package runs (e.g. a worktree of an older commit);
        ``env``: variables set for the server process on top of this one's."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--model", str(model), "--adapter-dir", str(store),
             "--data-dir", str(data), "--port", str(self.port), "--log-level", "warning", "--dtype", dtype, *extra_args],
            env={**os.environ, "SERVICE_MAX_BATCH_SIZE": str(max_batch), "SERVICE_MAX_WAIT_MS": str(max_wait_ms),
                 **(env or {})},
            cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("server did not become ready")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request_number(client: int, k: int, clients: int) -> int:
    """Which request of the load the ``k``-th one of ``client`` is (see :func:`request_bodies`)."""
    return k * clients + client


def request_adapter(i: int, adapters: list[str], base: str | None = "base") -> str | None:
    """The adapter of request number ``i``: every other one on the base (``base``), the rest in turn
    over ``adapters``."""
    return base if i % 2 == 0 else adapters[(i // 2) % len(adapters)]


def request_bodies(clients: int, per_client: int, adapters: list[str], images: list[str], max_new_tokens: int):
    """The JSON body of every request, serialised up front: half on the base, half over the adapters.

    Request ``k`` of client ``c`` is number ``k * clients + c``, so the requests in flight at any
    moment (the clients' ``k``-th ones) are themselves the mix: half on the base, the other half
    spread over the adapters, each with its own image while the pool lasts. (Numbering each
    client's requests one after another put all 16 clients on the same adapter, with only 2
    distinct images, at every step: batches that were never mixed.)
    """
    bodies = []
    for c in range(clients):
        mine = []
        for k in range(per_client):
            i = request_number(c, k, clients)
            adapter = request_adapter(i, adapters)
            mine.append(json.dumps({"instruction": QUESTIONS[i % len(QUESTIONS)], "images": [images[i % len(images)]],
                                    "max_new_tokens": max_new_tokens, "adapter": adapter}).encode())
        bodies.append(mine)
    return bodies


def run_load(url: str, clients: int, per_client: int, adapters: list[str], images: list[str], max_new_tokens: int):
    """``clients`` threads, each sending its requests one after another on one keep-alive connection.

    The load generator shares the machine's cores with the server, so it is kept lean: bodies are
    serialised before the clock starts and sent with the standard library's ``http.client``, which
    costs under 1 ms of CPU per request where ``httpx`` cost about 4 ms, a fifth of what the batched
    server itself needs at 16 clients (``bench/serve_variants.py`` compares the two).
    """
    host, port = urlsplit(url).hostname, urlsplit(url).port
    bodies = request_bodies(clients, per_client, adapters, images, max_new_tokens)
    headers = {"Content-Type": "application/json"}

    def client(c: int) -> list[float]:
        latencies = []
        connection = http.client.HTTPConnection(host, port, timeout=300)
        try:
            for body in bodies[c]:
                t = time.perf_counter()
                connection.request("POST", "/v1/answer", body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                if response.status != 200:
                    raise RuntimeError(f"/v1/answer answered {response.status}: {payload[:200]!r}")
                latencies.append(time.perf_counter() - t)
        finally:
            connection.close()
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - started
    return {"rps": len(latencies) / wall, "latencies": latencies}


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(server: Server, clients: int, per_client: int, adapters: list[str], images: list[str], max_new_tokens: int,
            load=None) -> dict:
    """One load run (``load``: a ``run_load``-like function, default ``run_load``), with the CPU time
    the server and this load generator spent per request."""
    return measured(server, lambda url: (load or run_load)(url, clients, per_client, adapters, images, max_new_tokens))


def measured(server: Server, run) -> dict:
    """``run(url)`` (returning a dict with ``latencies``), plus the CPU time per request of the server
    and of this process (the load generator)."""
    server_cpu, client_cpu = server.cpu_seconds(), own_cpu_seconds()
    result = run(server.url)
    n = len(result["latencies"])
    result["server_cpu_ms"] = (server.cpu_seconds() - server_cpu) * 1e3 / n
    result["client_cpu_ms"] = (own_cpu_seconds() - client_cpu) * 1e3 / n
    return result


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


BATCHED, SINGLE = "dynamic batching (max 16, 10 ms)", "batch size 1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per client count (median)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the servers' dtype (auto = float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--fresh-images", action="store_true",
                        help="give every request an image no server has seen, so that no image-feature or prefix "
                             "cache ever hits (default: a pool of 32 images; at 16 clients x 16 requests each image "
                             "comes back 8 times, with the same adapter and different questions)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        adapters = make_adapters(args.model, store, args.adapters, args.rank)
        pools = image_pools(args.clients, args.requests_per_client, args.rounds, args.fresh_images)
        warm_up = pools.pop("warm-up")
        servers: dict[str, Server] = {}
        try:
            for label, max_batch, wait in ((BATCHED, 16, 10.0), (SINGLE, 1, 0.0)):
                servers[label] = Server(args.model, store, Path(tmp) / f"data-{max_batch}", max_batch, wait, args.dtype)
                run_load(servers[label].url, 2, 2, adapters, warm_up, args.max_new_tokens)  # warm-up, loads adapters
            for clients in args.clients:
                for round_ in range(args.rounds):
                    images = pools[(clients, round_)]
                    order = (BATCHED, SINGLE) if round_ % 2 == 0 else (SINGLE, BATCHED)
                    for label in order:
                        runs.setdefault((label, clients), []).append(
                            measure(servers[label], clients, args.requests_per_client, adapters, images, args.max_new_tokens))
        finally:
            for server in servers.values():
                server.close()

    print(f"# serve load: {args.model.name}, {args.adapters} adapters (rank {args.rank}) + base, "
          f"max_new_tokens {args.max_new_tokens}, {args.requests_per_client} requests per client, {args.rounds} rounds, "
          f"dtype {args.dtype}, {'a new image for every request' if args.fresh_images else 'a pool of 32 images'}, "
          f"{platform.machine()} {os.cpu_count()} cores\n")
    print("| server | clients | requests | throughput req/s (median) | p50 ms | p95 ms | server CPU ms/req | load generator CPU ms/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (label, clients), rs in runs.items():
        latencies = [x for r in rs for x in r["latencies"]]
        print(f"| {label} | {clients} | {len(latencies)} | {statistics.median(r['rps'] for r in rs):.2f} | "
              f"{percentile(latencies, 0.5) * 1e3:.0f} | {percentile(latencies, 0.95) * 1e3:.0f} | "
              f"{statistics.median(r['server_cpu_ms'] for r in rs):.1f} | {statistics.median(r['client_cpu_ms'] for r in rs):.1f} |")
    print()
    for clients in args.clients:
        ratios = [b["rps"] / s["rps"] for b, s in zip(runs[(BATCHED, clients)], runs[(SINGLE, clients)], strict=True)]
        print(f"{clients} clients: dynamic batching / batch size 1 throughput = {statistics.median(ratios):.2f}x "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
