"""Does serving slow down once the server has fine-tuned an adapter or validated an upload?

Starts the real server (``python -m service serve``, batch size 1 so that every request's forward
passes are its own), then asks one client's questions one after another and reads the decode time
per generated token from each answer's ``timing_ms``; then uploads an adapter archive
(``POST /v1/adapters``), asks again, queues a small fine-tune (``POST /v1/finetune``), waits for it,
and asks again. Each phase reports the median over ``--requests`` answers, ``--rounds`` times.

A thread that has run a large torch operator keeps an OpenMP worker team while it lives, and
with more such workers than cores every other thread's parallel operators slow down
(service/model/threads.py): this script is how that was found and how its fix was checked.
``--tree PATH`` runs the server from another checkout (e.g. ``git worktree add /tmp/before <commit>``).

    python bench/serve_after_finetune.py [--dtype float32] [--requests 40] [--rounds 2] [--tree PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import Server, make_adapters, world_images  # noqa: E402
from service.config import DEFAULT_MODEL_DIR  # noqa: E402

QUESTION = "What colour is the part?"


def decode_ms_per_token(client: httpx.Client, url: str, image: str, n: int) -> float:
    """Median over ``n`` sequential answers of decode time / generated tokens (the first 3 dropped)."""
    per_token = []
    for _ in range(n + 3):
        r = client.post(url + "/v1/answer", json={"instruction": QUESTION, "images": [image], "max_new_tokens": 12})
        r.raise_for_status()
        body = r.json()
        per_token.append(body["timing_ms"]["decode"] / max(1, body["usage"]["completion_tokens"]))
    return statistics.median(per_token[3:])


def adapter_archive(model: Path, tmp: Path) -> bytes:
    """A random Dual-LoRA adapter for ``model``, zipped as an upload."""
    name = make_adapters(model, tmp / "made", 1, 16)[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in (tmp / "made" / name / "1").iterdir():
            zf.write(path, path.name)
    return buf.getvalue()


def finetune(client: httpx.Client, url: str, dataset: Path, epochs: int, timeout_s: float = 900) -> dict:
    with dataset.open("rb") as f:
        r = client.post(url + "/v1/finetune", data={"adapter": "bench-ft", "epochs": str(epochs), "batch_size": "8"},
                        files={"dataset": (dataset.name, f, "application/zip")})
    r.raise_for_status()
    job_id = r.json()["id"]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = client.get(f"{url}/v1/finetune/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise RuntimeError(f"fine-tune {job_id} did not finish in {timeout_s:g} s")


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32")
    parser.add_argument("--requests", type=int, default=40, help="answers per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per phase")
    parser.add_argument("--examples", type=int, default=48, help="fine-tuning examples")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose server runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    phases: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dataset = tmp / "inspection.zip"
        subprocess.run([sys.executable, "-m", "service.world", "--out", str(dataset), "--n", str(args.examples),
                        "--kind", "inspection"], check=True, cwd=ROOT, capture_output=True)
        archive = adapter_archive(args.model, tmp)
        image = world_images(1)[0]
        server = Server(args.model, tmp / "store", tmp / "data", max_batch=1, max_wait_ms=0, dtype=args.dtype,
                        tree=args.tree)
        try:
            with httpx.Client(timeout=120) as client:
                def measure(phase: str) -> None:
                    phases[phase] = [decode_ms_per_token(client, server.url, image, args.requests)
                                     for _ in range(args.rounds)]

                measure("fresh server")
                r = client.post(server.url + "/v1/adapters", data={"name": "bench-upload"},
                                files={"archive": ("adapter.zip", archive, "application/octet-stream")})
                r.raise_for_status()
                measure("after an adapter upload")
                job = finetune(client, server.url, dataset, args.epochs)
                measure(f"after a fine-tune ({job['status']})")
        finally:
            server.close()

    print(f"# serving after fine-tuning: {args.model.name}, {args.dtype}, batch size 1, one client, "
          f"{args.requests} answers x {args.rounds} rounds per phase, server from {args.tree}, "
          f"{platform.machine()} {os.cpu_count()} cores\n")
    print("| phase | decode ms per token (median per round) | vs fresh |")
    print("|---|---|---:|")
    fresh = statistics.median(phases["fresh server"])
    for phase, values in phases.items():
        print(f"| {phase} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values) / fresh:.2f}x |")
    print(json.dumps({k: [round(v, 3) for v in vs] for k, vs in phases.items()}))
    return phases


if __name__ == "__main__":
    main()
