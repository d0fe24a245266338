"""One join pass on the demo base, its padding skipped or not.

When newcomers join running rows (``RunningBatch.step``), one forward pass carries each running
row's next token, in the last position, and each newcomer's prompt after its cached image prefix:
``--running`` rows of 1 real position and ``--joining`` rows of about ``--positions``, mostly
padding. Three ways to run it, timed round-robin in one process (alternating order), the pass's
keys and values reset before each call:

- ``padded``: every linear and every attention query over the whole ``[B, L]`` pass;
- ``packed``: the slot layers' base linears over the real positions only (``service.model.packing``);
- ``packed+split``: and the running rows attending with their last query only
  (``service.model.attention.rows_split``): what the engine runs on a CPU.

Every linear of the LLM has adapter slots, as in the server, and rows alternate between the base
and 4 random rank-16 Dual-LoRA adapters. The logits of the three are compared too.

    python bench/join_pass.py [--dtype float32] [--running 12] [--joining 7] [--positions 15] [--pairs 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import random_adapter  # noqa: E402
from service.config import DEFAULT_MODEL_DIR  # noqa: E402
from service.model.attention import last_query_rows, leading_last_only_rows  # noqa: E402
from service.model.base import load_base  # noqa: E402
from service.model.kv_cache import ReservedCache  # noqa: E402
from service.model.lora import adapter_batch  # noqa: E402
from service.model.packing import packed_tokens, packing_for  # noqa: E402
from service.model.serving_forward import ServingForward  # noqa: E402

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("padded", "packed", "packed+split")


def join_layout(running: int, joining: int, positions: int) -> torch.Tensor:
    """``[running + joining, positions]``, 1 on real positions: the running rows' last one, and each
    newcomer's rest (``positions``, ``positions - 1``, ``positions - 2``, ... in turn), right-aligned."""
    real = torch.zeros(running + joining, positions, dtype=torch.long)
    real[:running, -1] = 1
    for j in range(joining):
        real[running + j, j % 3 :] = 1
    return real


def mixed_slots(rows: int) -> torch.Tensor:
    """``[rows]`` slot ids alternating between the base (0) and the adapters in slots 1-4."""
    return torch.tensor([0 if i % 2 == 0 else 1 + (i // 2) % 4 for i in range(rows)])


def cached_rows(base, slots: torch.Tensor, cached: int, room: int,
                generator: torch.Generator) -> tuple[ReservedCache, Callable[[], None]]:
    """A cache holding ``cached`` random positions of each row on ``slots``, and what resets it to
    them (forgetting the columns a pass wrote since), with room for ``room`` more in place."""
    vocab = base.model.config.text_config.vocab_size
    rows = len(slots)
    cache = ReservedCache(base.model.config)
    with torch.no_grad(), adapter_batch(slots):
        base.model(input_ids=torch.randint(5, vocab, (rows, cached), generator=generator),
                   attention_mask=torch.ones(rows, cached, dtype=torch.long), cache=cache, use_cache=True,
                   logits_to_keep=1)
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    spare = torch.zeros(rows, kept[0][0].shape[1], room, kept[0][0].shape[3], dtype=kept[0][0].dtype)

    def reset() -> None:
        for layer, (keys, values) in zip(cache.layers, kept, strict=True):
            layer.adopt(torch.cat([keys, spare], 2), torch.cat([values, spare], 2), cached)

    return cache, reset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--running", type=int, default=12)
    parser.add_argument("--joining", type=int, default=7)
    parser.add_argument("--positions", type=int, default=15)
    parser.add_argument("--cached", type=int, default=175, help="positions already in every row's cache")
    parser.add_argument("--pairs", type=int, default=20, help="rounds of all three variants")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_base(args.model, dtype=getattr(torch, args.dtype), n_slots=8, max_rank=64, target_modules=ALL_LINEARS)
    for slot in range(1, 5):
        base.slots.load(slot, random_adapter(base, 16, seed=slot)[1])
    rows, length, cached = args.running + args.joining, args.positions, args.cached
    vocab = base.model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    slots = mixed_slots(rows)
    real = join_layout(args.running, args.joining, length)
    mask = torch.cat([torch.ones(rows, cached, dtype=torch.long), real], dim=1)
    ids = torch.randint(5, vocab, (rows, length), generator=generator)
    positions = torch.arange(cached, cached + length).expand(rows, length)
    cache, reset = cached_rows(base, slots, cached, length + 8, generator)
    forward = ServingForward(base.model)  # the engine's forward pass

    def run(variant: str) -> tuple[float, torch.Tensor]:
        reset()  # (the pass's own columns forgotten)
        packing = packing_for(real) if variant != "padded" else None
        split = leading_last_only_rows(real) if variant == "packed+split" else 0
        start = time.perf_counter()
        with torch.no_grad(), adapter_batch(slots), packed_tokens(packing), last_query_rows(split):
            out = forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)
        return (time.perf_counter() - start) * 1e3, out.logits[:, -1].float()

    logits = {variant: run(variant)[1] for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(args.pairs):
        for variant in (VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]):
            times[variant].append(run(variant)[0])

    real_positions = int(real.sum())
    print(f"# join pass: {args.model.name}, {args.dtype}, {torch.get_num_threads()} threads, {args.running} running "
          f"rows + {args.joining} joining, {length} positions ({real_positions} real of {rows * length}), "
          f"{cached} cached, {args.pairs} rounds, {platform.machine()} {platform.processor() or ''}".rstrip())
    print()
    print("| variant | median ms | largest logit difference from padded |")
    print("|---|---:|---:|")
    for variant in VARIANTS:
        difference = (logits[variant] - logits["padded"]).abs().max().item()
        print(f"| {variant} | {statistics.median(times[variant]):.2f} | {difference:.2e} |")
    print()
    padded = statistics.median(times["padded"])
    print("speed-up over padded: " + ", ".join(
        f"{variant} {padded / statistics.median(times[variant]):.2f}x" for variant in VARIANTS[1:]))


if __name__ == "__main__":
    main()
