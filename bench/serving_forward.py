"""transformers' forward pass against the serving one (``service/model/serving_forward.py``).

The passes the engine runs, on the demo base with adapter slots on every linear and rows
alternating between the base and 4 random rank-16 Dual-LoRA adapters (on ``q_proj`` and
``v_proj``, as ``bench/serve_load.py`` makes them): decode steps of ``--rows`` rows over
``--cached`` cached positions, and a join pass (``--running`` rows of one token and ``--joining``
newcomers of up to ``--positions``, packed and split as the engine runs it). Both forwards are
timed alternately in one process (the order reversed every other round), the cache reset before
each call; the logits of the two are compared.

    python bench/serving_forward.py [--dtype float32] [--rows 1 4 12 16] [--rounds 40]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.join_pass import ALL_LINEARS, cached_rows, join_layout, mixed_slots  # noqa: E402
from bench.serve_load import random_adapter  # noqa: E402
from service.config import DEFAULT_MODEL_DIR  # noqa: E402
from service.model.attention import last_query_rows, leading_last_only_rows  # noqa: E402
from service.model.base import load_base  # noqa: E402
from service.model.generate import left_padded_positions  # noqa: E402
from service.model.lora import adapter_batch  # noqa: E402
from service.model.packing import packed_tokens, packing_for  # noqa: E402
from service.model.serving_forward import ServingForward  # noqa: E402

FORWARDS = ("transformers", "serving")


def time_pass(base, rows: int, length: int, real: torch.Tensor, cached: int, rounds: int,
              generator: torch.Generator) -> dict[str, float]:
    """Median ms of one pass of ``length`` new positions (``real [rows, length]``: 1 = a token)
    after ``cached`` positions, through each forward; and their largest logit difference."""
    vocab = base.model.config.text_config.vocab_size
    slots = mixed_slots(rows)
    cache, reset = cached_rows(base, slots, cached, length + 31, generator)
    mask = torch.cat([torch.ones(rows, cached, dtype=torch.long), real], dim=1)
    ids = torch.randint(5, vocab, (rows, length), generator=generator)
    positions = left_padded_positions(mask)[:, -length:]
    packing = packing_for(real) if length > 1 else None
    split = leading_last_only_rows(real) if length > 1 else 0
    serving = ServingForward(base.model)
    forwards = {
        "transformers": lambda: base.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                           use_cache=True, logits_to_keep=torch.tensor([-1])),
        "serving": lambda: serving(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                   last_only=True),
    }

    def run(name: str) -> tuple[float, torch.Tensor]:
        reset()  # (the pass's own columns forgotten)
        start = time.perf_counter()
        with torch.no_grad(), adapter_batch(slots), packed_tokens(packing), last_query_rows(split):
            out = forwards[name]()
        return (time.perf_counter() - start) * 1e3, out.logits[:, -1].float()

    logits = {name: run(name)[1] for name in FORWARDS}
    times: dict[str, list[float]] = {name: [] for name in FORWARDS}
    for round_ in range(rounds):
        for name in FORWARDS if round_ % 2 == 0 else FORWARDS[::-1]:
            times[name].append(run(name)[0])
    result = {name: statistics.median(times[name]) for name in FORWARDS}
    result["difference"] = (logits["serving"] - logits["transformers"]).abs().max().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 12, 16], help="rows of the decode steps")
    parser.add_argument("--cached", type=int, default=170, help="positions already in every row's cache")
    parser.add_argument("--running", type=int, default=4, help="join pass: running rows")
    parser.add_argument("--joining", type=int, default=6, help="join pass: newcomers")
    parser.add_argument("--positions", type=int, default=12, help="join pass: the longest newcomer's rest")
    parser.add_argument("--rounds", type=int, default=40, help="timed calls of each forward per pass (median)")
    args = parser.parse_args()

    base = load_base(args.model, dtype=getattr(torch, args.dtype), n_slots=8, max_rank=64, target_modules=ALL_LINEARS)
    for slot in range(1, 5):
        base.slots.load(slot, random_adapter(base, 16, seed=slot)[1])
    generator = torch.Generator().manual_seed(0)
    results = []
    for rows in args.rows:
        real = torch.ones(rows, 1, dtype=torch.long)
        results.append((f"decode, {rows} rows", time_pass(base, rows, 1, real, args.cached, args.rounds, generator)))
    real = join_layout(args.running, args.joining, args.positions)
    label = f"join, {args.running} running + {args.joining} joining ({int(real.sum())} real of {real.numel()})"
    results.append((label, time_pass(base, len(real), args.positions, real, args.cached, args.rounds, generator)))

    print(f"# serving forward: {args.model.name}, {args.dtype}, {torch.get_num_threads()} threads, {args.cached} "
          f"cached positions, {args.rounds} rounds, {platform.machine()} {platform.processor() or ''}".rstrip())
    print()
    print("| pass | transformers ms | serving ms | speed-up | largest logit difference |")
    print("|---|---:|---:|---:|---:|")
    for label, result in results:
        print(f"| {label} | {result['transformers']:.2f} | {result['serving']:.2f} | "
              f"{result['transformers'] / result['serving']:.2f}x | {result['difference']:.1e} |")


if __name__ == "__main__":
    main()
