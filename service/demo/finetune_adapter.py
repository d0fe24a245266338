"""Fine-tune the demo ``line-inspection`` Dual-LoRA adapter on the frozen demo base.

Usage::

    python -m service.demo.finetune_adapter --base service/assets/demo-base --out /tmp/line-inspection \
        [--n-train 400] [--epochs 8] [--rank 16] [--seed 0]

Renders ``n_train`` labelled inspection images (seeded, never the evaluation seed), encodes them
once with the frozen vision tower + VCE (the base is frozen, so features can be cached), trains an
adapter with :func:`trainable_adapter` / :func:`adapter_loss` and AdamW, saves it with
:func:`save_adapter` (plus ``metrics.json``) and evaluates it on held-out inspection images.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.demo.data import EVAL_SEED
from service.demo.evaluate import evaluate
from service.model.base import BaseModel, load_base
from service.model.lora import AdapterConfig, AdapterWeights, save_adapter
from service.model.training import TrainingExample, adapter_loss, build_batch, cosine_lr, trainable_adapter
from service.world import generate_examples

log = logging.getLogger("service.demo.finetune_adapter")


def train_adapter(
    base: BaseModel,
    adapter: AdapterWeights,
    examples: Sequence[tuple[Any, dict]],
    features: Callable[[list[int]], Sequence[torch.Tensor]],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    start: float | None = None,
    label: str = "",
) -> tuple[int, float]:
    """Train ``adapter`` on one-image ``examples`` with AdamW and a cosine learning rate.

    ``features(indices)`` gives each example's image features ``[tokens_per_image, d_llm]`` (cached,
    or computed with gradients when the adapter also covers vision layers). Logs step / loss / ETA
    (timed from ``start``); returns the number of steps and the last batch's loss.
    """
    start = time.perf_counter() if start is None else start
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * epochs
    rng = random.Random(seed)
    step = 0
    loss_value = float("nan")
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total)
            batch = build_batch(
                base, [TrainingExample(examples[i][1]["instruction"], examples[i][1]["answer"], [examples[i][0]]) for i in idx]
            )
            loss = adapter_loss(base, batch, adapter, image_features=[[f] for f in features(idx)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_value = loss.item()
            if step % 10 == 0 or step == total:
                elapsed = time.perf_counter() - start
                log.info("%sepoch %d step %d/%d loss=%.4f | %.0fs elapsed, ETA %.0fs", label, epoch + 1, step, total,
                         loss_value, elapsed, elapsed / step * (total - step))
    return total, loss_value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("service/assets/demo-base"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--method", choices=("DUAL_LORA", "LORA"), default="DUAL_LORA")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        help="comma-separated LLM linears (default: all seven, the service's default, docs/ablation.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    train_seed = 2000 + args.seed
    if train_seed == EVAL_SEED:
        raise ValueError("the training seed collides with the evaluation seed")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    base = load_base(args.base, n_slots=2, max_rank=args.rank, target_modules=targets)
    size = base.model.config.vision_config.image_size
    start = time.perf_counter()
    examples = generate_examples(args.n_train, train_seed, kind="inspection", size=size)
    features: list[torch.Tensor] = []
    for i in range(0, len(examples), 64):
        features.extend(base.encode_images(base.preprocess_images([im for im, _ in examples[i : i + 64]])))
    config = AdapterConfig(
        peft_type=args.method,
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=targets,
        base_model_name_or_path=base.model_id,
        base_model_fingerprint=base.fingerprint,
    )
    adapter = trainable_adapter(base, config, seed=args.seed)
    steps, loss_value = train_adapter(
        base, adapter, examples, lambda idx: [features[i] for i in idx],
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, start=start,
    )
    train_seconds = time.perf_counter() - start
    adapter.eval()
    save_adapter(args.out, config, adapter)
    base.slots.load(1, adapter)
    metrics: dict[str, Any] = {
        "method": args.method,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": targets,
        "n_train": args.n_train,
        "train_seed": train_seed,
        "epochs": args.epochs,
        "steps": steps,
        "final_train_loss": round(loss_value, 4),
        "train_seconds": round(train_seconds, 1),
    }
    if args.eval_n:
        metrics["eval_inspection"] = evaluate(base, n=args.eval_n, kind="inspection", seed=EVAL_SEED, slot=1)
        metrics["eval_inspection_base"] = evaluate(base, n=args.eval_n, kind="inspection", seed=EVAL_SEED, slot=0)
        metrics["eval_general_with_adapter"] = evaluate(base, n=args.eval_n, kind="general", seed=EVAL_SEED, slot=1)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
