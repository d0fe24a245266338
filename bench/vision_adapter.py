"""Does adapting the vision side help the ``line-inspection`` adapter? (issue 3)

The shipped recipe (``service.demo.finetune_adapter``) trains Dual-LoRA on the seven LLM linears
of the frozen demo base. The paper also trains the projector and VCE in its fine-tuning stage, so
this script trains the same adapter three ways, on the same images, seed, steps and learning rate:

``llm``                    Dual-LoRA r on q,k,v,o,gate,up,down of every LLM layer (the shipped recipe);
``llm+projector``          plus Dual-LoRA on the VCE attention and MLP projector linears
                           (sampling_offsets, attention_weights, value_proj, output_proj, linear_1/2);
``llm+tower+projector``    plus Dual-LoRA on the vision tower's q,k,v,out_proj,fc1,fc2 as well.

What is frozen is computed once: the ``llm`` arm caches the image features, ``llm+projector`` the
projector's input (the selected tower levels); ``llm+tower+projector`` runs the tower every step.
Each arm is scored on the same held-out inspection images (overall, by size and by defect type)
and timed; the JSON has everything, ``--report`` prints the markdown table of docs/model-card.md.

    python bench/vision_adapter.py --out bench/results/vision_adapter.json
    python bench/vision_adapter.py --report bench/results/vision_adapter.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from service.demo.data import EVAL_SEED  # noqa: E402
from service.demo.evaluate import answer_all, inspection_metrics  # noqa: E402
from service.demo.finetune_adapter import train_adapter  # noqa: E402
from service.model.base import BaseModel, load_base  # noqa: E402
from service.model.lora import AdapterConfig, adapter_batch  # noqa: E402
from service.model.lora.slots import inject_adapter_slots  # noqa: E402
from service.model.lora.weights import AdapterWeights  # noqa: E402
from service.model.training import trainable_adapter  # noqa: E402
from service.world import generate_examples  # noqa: E402

log = logging.getLogger("bench.vision_adapter")

LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROJECTOR_TARGETS = ["sampling_offsets", "attention_weights", "value_proj", "output_proj", "linear_1", "linear_2"]
TOWER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ARMS = ("llm", "llm+projector", "llm+tower+projector")
TRAIN_SEED = 2000  # the shipped recipe's world seed (finetune_adapter: 2000 + seed 0)


def build_arm(base: BaseModel, arm: str, rank: int, seed: int) -> AdapterWeights:
    """One trainable adapter over the arm's layers: the LLM slots ``load_base`` made, plus slot
    layers injected here into the projector / tower (the service serves LLM-side adapters only)."""
    config = AdapterConfig(peft_type="DUAL_LORA", r=rank, lora_alpha=2.0 * rank, target_modules=LLM_TARGETS)
    llm = trainable_adapter(base, config, seed=seed)
    layers = dict(llm.items())
    vision_parts = []
    if arm in ("llm+projector", "llm+tower+projector"):
        vision_parts.append((base.projector, PROJECTOR_TARGETS, "model.multi_modal_projector"))
    if arm == "llm+tower+projector":
        vision_parts.append((base.model.model.vision_tower, TOWER_TARGETS, "model.vision_tower"))
    for k, (module, targets, prefix) in enumerate(vision_parts):
        slots = inject_adapter_slots(module, targets, n_slots=1, max_rank=rank, prefix=prefix)
        part_config = AdapterConfig(peft_type="DUAL_LORA", r=rank, lora_alpha=2.0 * rank, target_modules=targets)
        part = slots.new_adapter(part_config, seed=seed + 1 + k)
        part.requires_grad_(True)
        part.train()
        layers |= dict(part.items())
    return AdapterWeights("DUAL_LORA", layers)


def frozen_inputs(base: BaseModel, arm: str, pixels: torch.Tensor) -> torch.Tensor:
    """What the arm can compute once: features (``llm``), projector inputs, or the pixels themselves."""
    if arm == "llm+tower+projector":
        return pixels
    captured: list[torch.Tensor] = []
    hook = None
    if arm == "llm+projector":
        hook = base.projector.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        outs = [base.encode_images(pixels[i : i + 100]) for i in range(0, len(pixels), 100)]
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(captured if arm == "llm+projector" else outs)


def arm_features(base: BaseModel, arm: str, inputs: torch.Tensor, adapter: AdapterWeights) -> torch.Tensor:
    """``[B, tokens_per_image, d_llm]`` features of a batch, through the arm's trainable layers."""
    if arm == "llm":
        return inputs
    with adapter_batch(trainable=adapter):
        return base.projector(inputs) if arm == "llm+projector" else base.image_features(inputs)


def run_arm(args: argparse.Namespace, arm: str, examples: list, pixels: torch.Tensor, held_out: list) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    base = load_base(args.base, n_slots=1, max_rank=args.rank, target_modules=LLM_TARGETS)
    adapter = build_arm(base, arm, args.rank, args.seed)
    start = time.perf_counter()
    inputs = frozen_inputs(base, arm, pixels)
    steps, loss_value = train_adapter(
        base, adapter, examples, lambda idx: arm_features(base, arm, inputs[idx], adapter),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, start=start, label=f"{arm} ",
    )
    train_seconds = time.perf_counter() - start
    adapter.eval()
    # The trainable adapter on every row: the LLM's layers through generate(adapter=), the vision
    # side's through this outer block, which is active while generate encodes the images.
    with torch.no_grad(), adapter_batch(trainable=adapter):
        predictions = answer_all(base, held_out, adapter=adapter)
    return {
        "arm": arm,
        "trainable_params": sum(p.numel() for p in adapter.parameters()),
        "steps": steps,
        "final_train_loss": round(loss_value, 4),
        "train_seconds": round(train_seconds, 1),
        "inspection": inspection_metrics([r for _, r in held_out], predictions),
    }


def report(results: dict[str, Any]) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    arms = results["arms"]
    first = arms[0]["train_seconds"]
    lines = [
        "| adapter on | trainable params | train s (× llm) | defective/ok | type | location | exact | "
        "chip found | tiny found | ok passed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        m = a["inspection"]
        lines.append(
            f"| {a['arm']} | {a['trainable_params']:,} | {a['train_seconds']:.0f} ({a['train_seconds'] / first:.2f}×) | "
            f"{pct(m['defective_accuracy'])} | {pct(m['type_accuracy'])} | {pct(m['location_accuracy'])} | "
            f"{pct(m['exact_match'])} | {pct(m['by_defect'].get('chip', {}).get('defective_accuracy'))} | "
            f"{pct(m['by_size'].get('tiny', {}).get('defective_accuracy'))} | "
            f"{pct(m['by_size'].get('ok', {}).get('defective_accuracy'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("service/assets/demo-base"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/vision_adapter.json"))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--report", type=Path, default=None, help="print the table of a finished run and exit")
    args = parser.parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    reader = load_base(args.base, n_slots=0)  # for the image size and preprocessing only
    size = reader.model.config.vision_config.image_size
    examples = generate_examples(args.n_train, TRAIN_SEED + args.seed, kind="inspection", size=size)
    held_out = generate_examples(args.eval_n, EVAL_SEED, kind="inspection", size=size)
    pixels = torch.cat([reader.preprocess_images([im for im, _ in examples[i : i + 100]])
                        for i in range(0, len(examples), 100)])
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "report"},
        "arms": [],
    }
    for arm in args.arms:
        results["arms"].append(run_arm(args, arm, examples, pixels, held_out))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log.info("%s: %s", arm, json.dumps({k: v for k, v in results["arms"][-1]["inspection"].items()
                                              if not k.startswith("by_")}))
    print(report(results))
    return results


if __name__ == "__main__":
    main()
