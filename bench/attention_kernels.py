"""Attention kernels on this CPU at the demo base's shapes: SDPA in the model's dtype, SDPA in float32
(``service.model.attention``), and plain matmul attention ("eager").

Shapes: 4 heads of 64 (the demo LLM), a decode step (one query over ~170 cached positions) and a
prefill (~158 tokens), 1 and 16 rows, a boolean mask with left padding. Every call uses a new length
(150-179), as serving does: a kernel that builds a plan per shape pays for it here. Kernels are
timed round-robin, median of ``--repeats`` rounds.

    python bench/attention_kernels.py [--dtype bfloat16] [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 4, 64


def sdpa(query, key, value, mask):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def sdpa_float32(query, key, value, mask):
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask).to(query.dtype)


def eager(query, key, value, mask):
    weights = torch.matmul(query, key.transpose(-1, -2)) * HEAD_DIM**-0.5
    weights = weights.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


KERNELS = {"sdpa": sdpa, "sdpa_float32": sdpa_float32, "eager": eager}


def inputs(rows: int, q_len: int, kv_len: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, HEADS, q_len, HEAD_DIM, generator=g).to(dtype)
    key = torch.randn(rows, HEADS, kv_len, HEAD_DIM, generator=g).to(dtype)
    value = torch.randn(rows, HEADS, kv_len, HEAD_DIM, generator=g).to(dtype)
    mask = torch.ones(rows, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    mask[0, ..., :3] = False  # left padding
    return query, key, value, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cases = [(rows, phase) for rows in (1, 16) for phase in ("decode", "prefill")]
    times: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats):
        length = 150 + repeat % 30
        for rows, phase in cases:
            q_len = 1 if phase == "decode" else length
            data = inputs(rows, q_len, length, dtype, seed=repeat)
            for name in list(KERNELS)[repeat % 3 :] + list(KERNELS)[: repeat % 3]:
                started = time.perf_counter()
                KERNELS[name](*data)
                times.setdefault((rows, phase, name), []).append((time.perf_counter() - started) * 1e6)
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, "
          f"median of {args.repeats}")
    print(f"| rows | phase | {' | '.join(f'{k} us' for k in KERNELS)} | sdpa / sdpa_float32 |")
    print("|---:|---|" + "---:|" * (len(KERNELS) + 1))
    report = []
    for rows, phase in cases:
        medians = {name: statistics.median(times[(rows, phase, name)]) for name in KERNELS}
        print(f"| {rows} | {phase} | " + " | ".join(f"{medians[k]:.0f}" for k in KERNELS)
              + f" | {medians['sdpa'] / medians['sdpa_float32']:.2f}x |")
        report.append({"rows": rows, "phase": phase, "median_us": medians})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "machine": platform.machine(), "repeats": args.repeats, "cases": report}, f, indent=1)


if __name__ == "__main__":
    main()
