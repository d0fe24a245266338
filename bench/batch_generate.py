"""What batching can buy in the model alone: ``generate`` on one batch of 16 requests vs each alone.

The requests are the load test's (``bench/serve_load.py``): a world inspection close-up, an
inspection/colour/part question, ``max_new_tokens`` 12, rows spread over the base and 4 random
Dual-LoRA slots. Image features are cached (as in the server after the first request for an
image), so this times the LLM: prefill, decode, and the per-row cost of each. It also counts the
prefill's multiply-adds (2 x LLM linear parameters x prompt tokens, attention excluded) to show
how close a batched prefill runs to what one large matmul reaches on the same cores (printed
too): when it is close, batching cannot make it cheaper, and the ratio printed last bounds what any server can gain from
batching on this machine for this workload.

    python bench/batch_generate.py [--batch 16] [--repeats 7] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import QUESTIONS, random_adapter  # noqa: E402
from service.config import DEFAULT_MODEL_DIR  # noqa: E402
from service.model.base import load_base  # noqa: E402
from service.model.generate import BatchTiming, GenerationRequest, ImageFeatureCache, generate  # noqa: E402
from service.world import generate_examples  # noqa: E402


def requests_like_the_load_test(base, n: int, n_adapters: int, rank: int, max_new_tokens: int) -> list[GenerationRequest]:
    for slot in range(1, n_adapters + 1):
        base.slots.load(slot, random_adapter(base, rank, seed=slot)[1])
    images = [image for image, _ in generate_examples(n, seed=777, kind="inspection")]
    return [
        GenerationRequest(QUESTIONS[i % len(QUESTIONS)], [images[i]], slot=0 if i % 2 == 0 else 1 + (i // 2) % n_adapters,
                          max_new_tokens=max_new_tokens)
        for i in range(n)
    ]


def llm_linear_parameters(base) -> int:
    """Parameters of the LLM's linear layers (what a prompt token multiplies through), LM head excluded."""
    llm = base.model.model.language_model
    return sum(m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear))


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """What this machine's cores reach on one large square matmul: a practical arithmetic peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e9


def timed(base, requests: list[GenerationRequest], cache: ImageFeatureCache) -> tuple[float, BatchTiming, list]:
    timing = BatchTiming()
    started = time.perf_counter()
    results = generate(base, requests, cache=cache, timing=timing)
    return (time.perf_counter() - started) * 1e3, timing, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.model, n_slots=4, max_rank=16, dtype=getattr(torch, args.dtype))
    requests = requests_like_the_load_test(base, args.batch, 4, 16, args.max_new_tokens)
    cache = ImageFeatureCache()
    generate(base, requests, cache=cache)  # warm-up; fills the feature cache

    alone, together = [], []
    for _ in range(args.repeats):  # alternate the two, so machine noise hits both
        runs = [timed(base, [r], cache) for r in requests]
        alone.append((sum(ms for ms, _, _ in runs), sum(t.prefill_ms for _, t, _ in runs), sum(t.decode_ms for _, t, _ in runs)))
        ms, t, results = timed(base, requests, cache)
        together.append((ms, t.prefill_ms, t.decode_ms))
    n = len(requests)
    med = {label: [statistics.median(x[i] for x in xs) / n for i in range(3)] for label, xs in (("alone", alone), ("batch", together))}

    prompt_tokens = sum(r.prompt_tokens for r in results)
    flops = 2 * llm_linear_parameters(base) * prompt_tokens
    answer_tokens = [r.completion_tokens for r in results]
    print(f"# batch_generate: {args.model.name}, {n} requests, {prompt_tokens / n:.0f} prompt tokens and "
          f"{statistics.mean(answer_tokens):.1f} answer tokens each (1..{max(answer_tokens)}), {args.dtype}, "
          f"{torch.get_num_threads()} torch threads, {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"median of {args.repeats}\n")
    print("| run | ms per request | prefill ms per request | decode ms per request | prefill GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for label, (total, prefill, decode) in med.items():
        name = "each request alone" if label == "alone" else f"one batch of {n}"
        print(f"| {name} | {total:.2f} | {prefill:.2f} | {decode:.2f} | {flops / n / (prefill * 1e-3) / 1e9:.0f} |")
    print(f"\nlarge-matmul peak on this machine ({args.dtype}, 2048x2048): {matmul_gflops(base.dtype):.0f} GFLOP/s")
    print(f"batching speed-up in the model alone: {med['alone'][0] / med['batch'][0]:.2f}x "
          f"(prefill {med['alone'][1] / med['batch'][1]:.2f}x, decode {med['alone'][2] / med['batch'][2]:.2f}x)")


if __name__ == "__main__":
    main()
