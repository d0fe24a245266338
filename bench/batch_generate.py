"""What batching can buy in the model alone: ``generate`` on one batch of 16 requests vs each alone.

The requests are the load test's (``bench/serve_load.py``): a world inspection close-up, an
inspection/colour/part question, ``max_new_tokens`` 12, rows spread over the base and 4 random
Dual-LoRA slots. Image features are cached (as in the server after the first request for an
image), so this times the LLM: prefill, decode, and the per-row cost of each. It also counts the
prefill's multiply-adds (2 x LLM linear parameters x prompt tokens, attention excluded) to show
how close a batched prefill runs to what one large matmul reaches on the same cores (printed
too): when it is close, batching cannot make it cheaper, and the ratio printed last bounds what any server can gain from
batching on this machine for this workload.

``--profile`` adds where each run's time goes, by operator kind (matmuls, attention, the rest),
and the speed-up batching would reach if everything in the batched run but its matmuls were free.
``--compile`` also times the prompt's forward pass (the compute-bound part, no KV cache) through
the language model as is and through ``torch.compile`` (dynamic shapes), one row and the batch,
to see whether fused kernels change the picture.

    python bench/batch_generate.py [--batch 16] [--repeats 7] [--dtype float32] [--profile] [--compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import QUESTIONS, random_adapter  # noqa: E402
from service.config import DEFAULT_MODEL_DIR  # noqa: E402
from service.model.base import load_base  # noqa: E402
from service.model.generate import (  # noqa: E402
    BatchTiming,
    GenerationRequest,
    ImageFeatureCache,
    embed_prompts,
    encode_prompt,
    generate,
    image_features,
    left_padded_positions,
)
from service.model.lora.context import adapter_batch  # noqa: E402
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


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm"}


def operator_kind(name: str) -> str:
    """Which of the three kinds a profiled operator is: ``matmul``, ``attention`` or ``other``."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    return "other"


def profile_by_kind(run: Callable[[], object], n_requests: int, repeats: int = 3) -> dict[str, float]:
    """Self CPU ms per request of each operator kind over ``repeats`` calls of ``run``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        totals[operator_kind(event.key)] += event.self_cpu_time_total / 1e3
    return {kind: ms / (repeats * n_requests) for kind, ms in totals.items()}


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
    parser.add_argument("--profile", action="store_true", help="also break each run's time down by operator kind")
    parser.add_argument("--compile", action="store_true", help="also time the prefill forward eager vs torch.compile")
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
    if args.profile:
        print_profile(base, requests, cache, med["alone"][0])
    if args.compile:
        print_compiled_prefill(base, requests, cache, args.repeats)


def print_profile(base, requests: list[GenerationRequest], cache: ImageFeatureCache, alone_ms: float) -> None:
    """Self CPU ms per request by operator kind, alone and batched, and the bound it implies."""
    n = len(requests)
    kinds = {
        "each request alone": profile_by_kind(lambda: [generate(base, [r], cache=cache) for r in requests], n),
        f"one batch of {n}": profile_by_kind(lambda: generate(base, requests, cache=cache), n),
    }
    print("\nself CPU ms per request by operator kind (under the profiler, 3 runs each):\n")
    print("| run | matmul (linear layers, adapters) | attention | everything else |")
    print("|---|---:|---:|---:|")
    for label, ms in kinds.items():
        print(f"| {label} | {ms['matmul']:.2f} | {ms['attention']:.2f} | {ms['other']:.2f} |")
    batch_matmul = kinds[f"one batch of {n}"]["matmul"]
    print(f"\nspeed-up if the batched run's attention and other operators were free: "
          f"{alone_ms / batch_matmul:.2f}x (each request alone {alone_ms:.2f} ms, batched matmuls {batch_matmul:.2f} ms per request)")


def prefill_forward(base, requests: list[GenerationRequest], cache: ImageFeatureCache, language_model) -> Callable[[], object]:
    """One forward of the rows' prompts through ``language_model`` (no KV cache), each row on its slot."""
    ids = [encode_prompt(base, r.instruction, len(r.images)) for r in requests]
    embeds, mask = embed_prompts(base, ids, [image_features(base, r.images, cache) for r in requests])
    positions = left_padded_positions(mask)
    slots = torch.tensor([r.slot for r in requests])

    @torch.no_grad()
    def run() -> object:
        with adapter_batch(slots):
            return language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)

    return run


def print_compiled_prefill(base, requests: list[GenerationRequest], cache: ImageFeatureCache, repeats: int) -> None:
    """Prefill ms per request, eager vs ``torch.compile(dynamic=True)``, one row and the whole batch."""
    eager = base.model.model.language_model
    started = time.perf_counter()
    compiled = torch.compile(eager, dynamic=True)
    prefill_forward(base, requests, cache, compiled)()
    compile_s = time.perf_counter() - started
    n = len(requests)
    print(f"\nprefill forward (no KV cache), ms per request, median of {repeats} (compiling took {compile_s:.0f} s):\n")
    print("| rows | eager | torch.compile |")
    print("|---:|---:|---:|")
    for rows in (requests[:1], requests):
        runs = {label: prefill_forward(base, rows, cache, model) for label, model in (("eager", eager), ("compiled", compiled))}
        samples: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(repeats + 1):  # alternating, so machine noise hits both; the first round warms up
            for label, run in runs.items():
                started = time.perf_counter()
                run()
                samples[label].append((time.perf_counter() - started) * 1e3 / len(rows))
        eager_ms, compiled_ms = (statistics.median(samples[label][1:]) for label in runs)
        print(f"| {len(rows)} of {n} | {eager_ms:.2f} | {compiled_ms:.2f} |")


if __name__ == "__main__":
    main()
