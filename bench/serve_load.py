"""Load test of the running service: throughput and p50/p95 latency at 1, 4 and 16 clients.

Starts the real server (``python -m service serve``) twice on loopback — once with dynamic
batching (``--max-batch-size 16``) and once with batch size 1 — and drives each with N concurrent
clients, half on the base and half spread over several adapters, each sending a world image and a
question. The speed-up of dynamic batching is measured in the same run.

    python bench/serve_load.py [--model service/assets/demo-base] [--clients 1 4 16] [--requests-per-client 6]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.config import DEFAULT_MODEL_DIR  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model: Path, store: Path, n: int, rank: int) -> list[str]:
    """Random Dual-LoRA adapters for the base (their answers are noise; the cost is real)."""
    import torch

    from service.model.base import load_base
    from service.model.lora import AdapterConfig, save_adapter

    base = load_base(model, n_slots=1, max_rank=rank)
    names = []
    for i in range(n):
        config = AdapterConfig(r=rank, lora_alpha=2 * rank, base_model_fingerprint=base.fingerprint)
        adapter = base.slots.new_adapter(config, seed=i)
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.01)
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


class Server:
    def __init__(self, model: Path, store: Path, data: Path, max_batch: int, max_wait_ms: float, dtype: str = "auto"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--model", str(model), "--adapter-dir", str(store),
             "--data-dir", str(data), "--port", str(self.port), "--log-level", "warning", "--dtype", dtype],
            env={**os.environ, "SERVICE_MAX_BATCH_SIZE": str(max_batch), "SERVICE_MAX_WAIT_MS": str(max_wait_ms)},
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_load(url: str, clients: int, per_client: int, adapters: list[str], images: list[str], max_new_tokens: int):
    questions = ["Is this part defective? Where?", "What colour is the part?", "What part is this?"]

    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=300) as http:
            for k in range(per_client):
                i = c * per_client + k
                adapter = "base" if i % 2 == 0 else adapters[(i // 2) % len(adapters)]
                body = {"instruction": questions[i % len(questions)], "images": [images[i % len(images)]],
                        "max_new_tokens": max_new_tokens, "adapter": adapter}
                t = time.perf_counter()
                r = http.post(url + "/v1/answer", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - started
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies), "p95": p95, "n": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the servers' dtype (auto = float32 on CPU, bfloat16 on CUDA)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        store, data = Path(tmp) / "adapters", Path(tmp) / "data"
        adapters = make_adapters(args.model, store, args.adapters, args.rank)
        images = world_images(32)
        results: dict[tuple[str, int], dict] = {}
        for label, max_batch, wait in (("dynamic batching (max 16, 10 ms)", 16, 10.0), ("batch size 1", 1, 0.0)):
            server = Server(args.model, store, data, max_batch, wait, args.dtype)
            try:
                run_load(server.url, 2, 2, adapters, images, args.max_new_tokens)  # warm-up, loads adapters
                for clients in args.clients:
                    results[(label, clients)] = run_load(
                        server.url, clients, args.requests_per_client, adapters, images, args.max_new_tokens)
            finally:
                server.close()

    print(f"# serve load: {args.model.name}, {args.adapters} adapters (rank {args.rank}) + base, "
          f"max_new_tokens {args.max_new_tokens}, {args.requests_per_client} requests per client, dtype {args.dtype}, "
          f"{platform.machine()} {os.cpu_count()} cores\n")
    print("| server | clients | requests | throughput req/s | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for (label, clients), r in results.items():
        print(f"| {label} | {clients} | {r['n']} | {r['rps']:.2f} | {r['p50'] * 1e3:.0f} | {r['p95'] * 1e3:.0f} |")
    print()
    for clients in args.clients:
        speedup = results[("dynamic batching (max 16, 10 ms)", clients)]["rps"] / results[("batch size 1", clients)]["rps"]
        print(f"{clients} clients: dynamic batching / batch size 1 throughput = {speedup:.2f}x")


if __name__ == "__main__":
    main()
