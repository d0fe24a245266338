"""The paper's ablation (arXiv 2411.12787) in miniature, on the synthetic world and the demo base.

Five parts, each seeded, each over several seeds, all written to one JSON file:

``methods``    Dual-LoRA vs LoRA vs LoRA-MoE at equal trainable parameters, two budgets, one adapter
               trained on a mixture of six tasks whose answer formats conflict
               (:mod:`service.demo.mixture`); per-task and mean exact match on held-out images.
``internals``  Dual-LoRA without its LayerNorm, without its ReLU, without both (large budget).
``targets``    Dual-LoRA (large rank) on q,v vs q,k,v,o vs all seven LLM linears (picks the defaults).
``cost``       trainable parameters, training-step time and generation time of every variant,
               timed round-robin in one process (median of ``--cost-repeats``), as ratios to LoRA.
``vce``        two bases from the same recipe — the demo base's vision tower, then the language stage
               of ``service.demo.train_base`` from the same random LLM — one with VCE trained, one
               with VCE held at identity (= plain LLaVA); general accuracy per type, the same
               ``line-inspection`` Dual-LoRA recipe on each (tiny vs large defects), and a linear-probe
               check of whether defect presence is readable from each base's image features.

    python bench/ablation.py --parts methods internals cost --seeds 0 1 2 --steps 400 --batch-size 16 --lr 0.01
    python bench/ablation.py --parts targets --seeds 0 1 --steps 400 --batch-size 16 --lr 0.003
    python bench/ablation.py --parts vce --seeds 0 1 --batch-size 16 --language-steps 200 \
        --inspection-steps 300 --inspection-lr 0.01
    python bench/ablation.py --report      # the markdown tables of docs/ablation.md

Budgets (q_proj and v_proj of the 4 LLM layers, d_in = d_out = 256): per layer
``small`` = Dual-LoRA r=4 (3 080) / LoRA r=6 (3 072) / LoRA-MoE 4 experts r=1 (3 072);
``large`` = Dual-LoRA r=12 (9 240) / LoRA r=18 (9 216) / LoRA-MoE 4 experts r=4 (9 216).
Every adapter uses ``alpha = 2 r`` (scale 2), AdamW, the same learning rate, steps and batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from service.demo.data import DEMO_PRESET, EVAL_SEED, build_pool, tokenizer_corpus  # noqa: E402
from service.demo.evaluate import answer_all, general_metrics, inspection_metrics  # noqa: E402
from service.demo.mixture import TASK_NAMES, balanced_eval_examples, mixture_examples  # noqa: E402
from service.demo.train_base import train_language  # noqa: E402
from service.model.base import BaseModel, load_base  # noqa: E402
from service.model.generate import GenerationRequest, ImageFeatureCache, generate, image_features  # noqa: E402
from service.model.lora.variants import parameter_count, variant_adapter  # noqa: E402
from service.model.lora.weights import AdapterWeights  # noqa: E402
from service.model.presets import build_random_base  # noqa: E402
from service.model.training import TrainingExample, adapter_loss, build_batch  # noqa: E402
from service.world import DEFECT_TYPES, generate_examples  # noqa: E402

log = logging.getLogger("bench.ablation")

DEMO_BASE = Path(__file__).resolve().parents[1] / "service" / "assets" / "demo-base"
TARGETS = ("q_proj", "v_proj")
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "q,v": TARGETS,
    "q,k,v,o": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
BUDGETS: dict[str, dict[str, int]] = {
    "small": {"DUAL_LORA": 4, "LORA": 6, "LORA_MOE": 1},
    "large": {"DUAL_LORA": 12, "LORA": 18, "LORA_MOE": 4},
}
INTERNALS = ("DUAL_LORA_NO_LN", "DUAL_LORA_NO_RELU", "DUAL_LORA_NO_BOTH")
MIXTURE_TRAIN_SEED = 4000
INSPECTION_TRAIN_SEED = 2000
VCE_POOL_SEED = 3000


# -- shared helpers -------------------------------------------------------------------------------
def slot_layers(base: BaseModel, targets: tuple[str, ...] = TARGETS) -> dict[str, nn.Module]:
    """The base linears named in ``targets`` (``{module path: SlotLinear}``)."""
    assert base.slots is not None
    return {path: layer for path, layer in base.slots.layers.items() if path.rsplit(".", 1)[-1] in targets}


def encode_all(base: BaseModel, images: list, batch: int = 64) -> list[torch.Tensor]:
    """Frozen tower + projector features, one ``[tokens_per_image, d_llm]`` tensor per image."""
    out: list[torch.Tensor] = []
    for i in range(0, len(images), batch):
        out.extend(base.encode_images(base.preprocess_images(images[i : i + batch])))
    return out


def train(
    base: BaseModel,
    adapter: AdapterWeights,
    examples: list[tuple[Any, dict]],
    features: list[torch.Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, float]:
    """AdamW with linear warm-up and cosine decay on answer tokens; returns time and loss statistics."""
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    warmup = max(1, steps // 20)
    step_times, losses = [], []
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = [rng.randrange(len(examples)) for _ in range(batch_size)]
        batch = build_batch(
            base, [TrainingExample(examples[i][1]["instruction"], examples[i][1]["answer"], [None]) for i in idx]
        )
        loss = adapter_loss(base, batch, adapter, image_features=[[features[i]] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t0)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            log.info("  step %d/%d loss=%.4f | %.0fs elapsed, ETA %.0fs", step + 1, steps,
                     statistics.fmean(losses[-10:]), elapsed, elapsed / (step + 1) * (steps - step - 1))
    adapter.eval()
    return {
        "train_seconds": round(time.perf_counter() - start, 2),
        "step_ms_median": round(statistics.median(step_times) * 1e3, 2),
        "final_loss": round(statistics.fmean(losses[-10:]), 4),
    }


def answer(
    base: BaseModel, adapter: AdapterWeights | None, examples: list[tuple[Any, dict]], cache: ImageFeatureCache
) -> list[str]:
    """Greedy answers with ``adapter`` applied to every row (None = the base), 60 rows a batch."""
    return answer_all(base, examples, batch_size=60, adapter=adapter, cache=cache)


def warm_cache(base: BaseModel, examples: list[tuple[Any, dict]]) -> ImageFeatureCache:
    """An image-feature cache holding every example's image (evaluation skips the vision tower)."""
    cache = ImageFeatureCache(capacity=len(examples) + 8)
    images = [im for im, _ in examples]
    for i in range(0, len(images), 64):
        with torch.no_grad():
            image_features(base, images[i : i + 64], cache)
    return cache


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max (as fractions)."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


# -- methods and internals ------------------------------------------------------------------------
Variant = tuple[str, str, int, tuple[str, ...]]
"""``(label, adapter kind, rank, target module names)``."""


def run_mixture(args: argparse.Namespace, variants: list[Variant]) -> dict[str, Any]:
    """Train every variant on the task mixture for every seed; score per task."""
    targets = sorted({t for *_, ts in variants for t in ts})
    base = load_base(DEMO_BASE, n_slots=1, max_rank=32, target_modules=targets)
    size = base.model.config.vision_config.image_size
    train_examples = mixture_examples(args.mixture_train, MIXTURE_TRAIN_SEED, size=size)
    eval_examples = balanced_eval_examples(args.eval_per_task, EVAL_SEED, size=size)
    log.info("encoding %d training and %d held-out images", len(train_examples), len(eval_examples))
    features = encode_all(base, [im for im, _ in train_examples])
    cache = warm_cache(base, eval_examples)
    records = [r for _, r in eval_examples]
    results: dict[str, Any] = {"base": general_metrics(records, answer(base, None, eval_examples, cache))}
    for label, kind, r, variant_targets in variants:
        layers = slot_layers(base, variant_targets)
        runs = []
        for seed in args.seeds:
            log.info("%s (%s r=%d on %s) seed %d", label, kind, r, ",".join(variant_targets), seed)
            adapter = variant_adapter(layers, kind, r, alpha=2.0 * r, seed=seed)
            stats = train(base, adapter, train_examples, features, args.steps, args.batch_size, args.lr, seed)
            scores = general_metrics(records, answer(base, adapter, eval_examples, cache))
            per_task = {t: scores["per_type"][t]["accuracy"] for t in TASK_NAMES}
            log.info("  mean %.3f %s", scores["accuracy"], per_task)
            runs.append({"seed": seed, **stats, "mean": scores["accuracy"], "per_task": per_task})
        n_params = sum(p.numel() for p in adapter.parameters())
        results[label] = {
            "kind": kind,
            "r": r,
            "targets": list(variant_targets),
            "trainable_parameters": n_params,
            "mean": spread([run["mean"] for run in runs]),
            "per_task": {t: spread([run["per_task"][t] for run in runs]) for t in TASK_NAMES},
            "runs": runs,
        }
    return results


def methods_variants() -> list[Variant]:
    return [(f"{kind}@{budget}", kind, r, TARGETS) for budget, table in BUDGETS.items() for kind, r in table.items()]


def internals_variants() -> list[Variant]:
    r = BUDGETS["large"]["DUAL_LORA"]
    return [(f"{kind}@large", kind, r, TARGETS) for kind in INTERNALS]


def targets_variants() -> list[Variant]:
    """Dual-LoRA at the large rank on more of each LLM layer (more parameters: that is the question)."""
    r = BUDGETS["large"]["DUAL_LORA"]
    return [(f"DUAL_LORA on {name}", "DUAL_LORA", r, targets) for name, targets in TARGET_SETS.items()]


# -- cost -----------------------------------------------------------------------------------------
def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters, training-step and generation time of every variant, round-robin in one process."""
    base = load_base(DEMO_BASE, n_slots=1, max_rank=32, target_modules=list(TARGETS))
    size = base.model.config.vision_config.image_size
    examples = mixture_examples(48, MIXTURE_TRAIN_SEED + 1, size=size)
    features = encode_all(base, [im for im, _ in examples])
    cache = warm_cache(base, examples[:16])
    batch = build_batch(base, [TrainingExample(r["instruction"], r["answer"], [None]) for _, r in examples[:32]])
    layers = slot_layers(base)
    variants = [v for v in methods_variants() if v[0].endswith("@large")] + internals_variants()
    adapters = {label: variant_adapter(layers, kind, r, alpha=2.0 * r, seed=0) for label, kind, r, _ in variants}
    for adapter in adapters.values():  # non-zero B so every path does its real work
        for name, p in adapter.named_parameters():
            if name.endswith("lora_B"):
                nn.init.normal_(p, std=0.01)
    gen_requests = [GenerationRequest(r["instruction"], [im], max_new_tokens=8) for im, r in examples[:16]]

    def train_step(adapter: AdapterWeights) -> None:
        loss = adapter_loss(base, batch, adapter, image_features=[[features[i]] for i in range(32)])
        loss.backward()
        adapter.zero_grad(set_to_none=True)

    def gen(adapter: AdapterWeights | None) -> None:
        with torch.no_grad():
            generate(base, gen_requests, cache=cache, adapter=adapter)

    labels = list(adapters)
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label in labels:  # warm-up
        train_step(adapters[label])
        gen(adapters[label])
    gen(None)
    for rep in range(args.cost_repeats):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order + ["base"]:
            adapter = adapters.get(label)
            if adapter is not None:
                t0 = time.perf_counter()
                train_step(adapter)
                times[label]["train_step_ms"].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            gen(adapter)
            times[label]["generate_ms"].append((time.perf_counter() - t0) * 1e3)
    lora = {k: statistics.median(v) for k, v in times["LORA@large"].items()}
    out: dict[str, Any] = {}
    for label, kind, r, _ in variants:
        med = {k: statistics.median(v) for k, v in times[label].items()}
        per_layer = parameter_count(kind, 256, 256, r)
        out[label] = {
            "kind": kind,
            "r": r,
            "trainable_parameters": sum(p.numel() for p in adapters[label].parameters()),
            "parameters_per_layer": per_layer,
            **{k: round(v, 2) for k, v in med.items()},
            **{f"{k}_vs_lora": round(v / lora[k], 3) for k, v in med.items()},
        }
    base_gen = statistics.median(times["base"]["generate_ms"])
    out["base"] = {"generate_ms": round(base_gen, 2), "generate_ms_vs_lora": round(base_gen / lora["generate_ms"], 3)}
    out["setup"] = {"train_batch": 32, "generate_batch": 16, "max_new_tokens": 8, "repeats": args.cost_repeats,
                    "note": "trainable-path modules for every variant (the serving slot kernels are in "
                            "bench/adapter_overhead.py); image features cached, so vision is excluded"}
    return out


# -- VCE ------------------------------------------------------------------------------------------
class PresenceProbe(nn.Module):
    """Attention-pooled MLP probe: image tokens ``[B, N, d]`` → defect present / absent logits ``[B, 2]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        weights = (self.key(h) @ self.query / math.sqrt(h.shape[-1])).softmax(-1)
        return self.head(torch.einsum("bn,bnd->bd", weights, h))


def probe_presence(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   seed: int, steps: int = 400) -> float:
    """Held-out accuracy of a :class:`PresenceProbe` trained on frozen image features."""
    torch.manual_seed(seed)
    probe = PresenceProbe(train_x.shape[-1])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(train_x), (128,), generator=gen)
        loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return round((probe(test_x).argmax(-1) == test_y).float().mean().item(), 4)


def fresh_base(directory: str, seed: int, tower_from: BaseModel) -> BaseModel:
    """The recipe's random base (``seed``) with the demo base's trained vision tower copied in."""
    build_random_base(directory, DEMO_PRESET, seed=seed, corpus=tokenizer_corpus())
    logging.getLogger("service.model.base").setLevel(logging.ERROR)
    base = load_base(directory, n_slots=1, max_rank=32, target_modules=list(TARGETS))
    base.model.model.vision_tower.load_state_dict(tower_from.model.model.vision_tower.state_dict())
    return base


def run_vce(args: argparse.Namespace) -> dict[str, Any]:
    demo = load_base(DEMO_BASE, n_slots=0)
    size = demo.model.config.vision_config.image_size
    log.info("rendering %d general training images", args.vce_pool)
    pool = build_pool(args.vce_pool, VCE_POOL_SEED)
    insp_train = generate_examples(args.inspection_train, INSPECTION_TRAIN_SEED, kind="inspection", size=size)
    insp_eval = generate_examples(args.inspection_eval, EVAL_SEED, kind="inspection", size=size)
    eval_records = [r for _, r in insp_eval]

    def present(examples: list) -> torch.Tensor:
        return torch.tensor([int(r["meta"]["defect"] is not None) for _, r in examples])

    results: dict[str, Any] = {}
    for arm in ("vce", "no_vce"):
        runs = []
        for seed in args.seeds:
            log.info("VCE ablation: arm %s, seed %d: language stage %d steps", arm, seed, args.language_steps)
            with tempfile.TemporaryDirectory() as tmp:
                base = fresh_base(tmp, seed, demo)
                t0 = time.perf_counter()
                loss, steps_run = train_language(base, pool, args.language_steps, 48, 1e-3, seed,
                                                 train_vce=(arm == "vce"))
                language_seconds = time.perf_counter() - t0
            vce_delta = base.projector.attention.output_proj.weight.abs().max().item()
            general_examples = generate_examples(args.general_eval, EVAL_SEED, kind="general", size=size)
            general = general_metrics([r for _, r in general_examples],
                                      answer(base, None, general_examples, warm_cache(base, general_examples)))
            train_feats = encode_all(base, [im for im, _ in insp_train])
            eval_cache = warm_cache(base, insp_eval)
            eval_feats = torch.stack(encode_all(base, [im for im, _ in insp_eval]))
            probe = probe_presence(torch.stack(train_feats), present(insp_train), eval_feats, present(insp_eval), seed)
            adapter = variant_adapter(slot_layers(base), "DUAL_LORA", 16, alpha=32.0, seed=seed)
            stats = train(base, adapter, insp_train, train_feats, args.inspection_steps, args.batch_size,
                          args.inspection_lr, seed)
            inspection = inspection_metrics(eval_records, answer(base, adapter, insp_eval, eval_cache))
            by_size = inspection["by_size"]
            run = {
                "seed": seed,
                "language_steps": steps_run,
                "language_seconds": round(language_seconds, 1),
                "language_loss": round(loss, 4),
                "vce_output_proj_absmax": round(vce_delta, 5),
                "general": general["accuracy"],
                "general_per_type": {t: v["accuracy"] for t, v in general["per_type"].items()},
                "probe_presence": probe,
                "adapter": stats,
                "inspection": {k: inspection[k] for k in ("defective_accuracy", "type_accuracy",
                                                          "location_accuracy", "exact_match")},
                "tiny": {k: by_size.get("tiny", {}).get(k) for k in ("defective_accuracy", "exact_match")},
                "large": {k: by_size.get("large", {}).get(k) for k in ("defective_accuracy", "exact_match")},
                "ok": by_size.get("ok", {}).get("defective_accuracy"),
            }
            log.info("  %s", json.dumps(run))
            runs.append(run)
        params = sum(p.numel() for p in base.model.parameters())
        trained_projector = sum(p.numel() for p in base.projector.parameters()) if arm == "vce" else sum(
            p.numel() for p in base.projector.mlp.parameters())
        results[arm] = {
            "parameters": params,
            "trained_projector_parameters": trained_projector,
            "general": spread([r["general"] for r in runs]),
            "probe_presence": spread([r["probe_presence"] for r in runs]),
            "defective_accuracy": spread([r["inspection"]["defective_accuracy"] for r in runs]),
            "exact_match": spread([r["inspection"]["exact_match"] for r in runs]),
            "tiny_defective_accuracy": spread([r["tiny"]["defective_accuracy"] or 0.0 for r in runs]),
            "large_defective_accuracy": spread([r["large"]["defective_accuracy"] or 0.0 for r in runs]),
            "runs": runs,
        }
    results["setup"] = {
        "language_steps": args.language_steps, "language_batch": 48, "language_lr": 1e-3, "pool": args.vce_pool,
        "inspection_train": args.inspection_train, "inspection_steps": args.inspection_steps,
        "inspection_lr": args.inspection_lr, "adapter": "DUAL_LORA r=16 alpha=32 on q_proj, v_proj",
        "defect_types": list(DEFECT_TYPES),
    }
    return results


# -- report ---------------------------------------------------------------------------------------
def _pm(stats: dict[str, float]) -> str:
    """``mean ± std`` in percent, with the range over seeds."""
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f} ({100 * stats['min']:.0f}–{100 * stats['max']:.0f})"


def _mixture_table(part: dict[str, Any]) -> list[str]:
    lines = ["| variant | r | trainable params | " + " | ".join(TASK_NAMES) + " | mean |",
             "|---|---|---|" + "---|" * (len(TASK_NAMES) + 1)]
    base = part.get("base")
    if base:
        cells = [f"{100 * base['per_type'][t]['accuracy']:.0f}" for t in TASK_NAMES]
        lines.append(f"| base (no adapter) | – | 0 | {' | '.join(cells)} | {100 * base['accuracy']:.1f} |")
    for label, row in part.items():
        if not isinstance(row, dict) or "per_task" not in row:
            continue
        cells = [f"{100 * row['per_task'][t]['mean']:.1f} ± {100 * row['per_task'][t]['std']:.1f}" for t in TASK_NAMES]
        lines.append(f"| {label} | {row['r']} | {row['trainable_parameters']:,} | {' | '.join(cells)} | "
                     f"**{_pm(row['mean'])}** |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The tables of docs/ablation.md from a results file (percentages: mean ± std (min–max) over seeds)."""
    out: list[str] = []
    if "methods" in results:
        out += ["### Methods at equal trainable parameters", "", *_mixture_table(results["methods"]), ""]
    if "internals" in results:
        out += ["### Dual-LoRA internals (large budget)", "", *_mixture_table(results["internals"]), ""]
    if "targets" in results:
        lr = results["targets"].get("args", {}).get("lr")
        out += [f"### Dual-LoRA target modules (r = 12, lr {lr})", "", *_mixture_table(results["targets"]), ""]
    if "cost" in results:
        cost = results["cost"]
        out += ["### Cost (large budget, medians, one process, round-robin)", "",
                "| variant | trainable params | train step ms | vs LoRA | generate ms (16 rows) | vs LoRA |",
                "|---|---|---|---|---|---|"]
        for label, row in cost.items():
            if isinstance(row, dict) and "train_step_ms" in row:
                out.append(f"| {label} | {row['trainable_parameters']:,} | {row['train_step_ms']:.1f} | "
                           f"{row['train_step_ms_vs_lora']:.3f} | {row['generate_ms']:.1f} | "
                           f"{row['generate_ms_vs_lora']:.3f} |")
        if "base" in cost:
            out.append(f"| base (no adapter) | 0 | – | – | {cost['base']['generate_ms']:.1f} | "
                       f"{cost['base']['generate_ms_vs_lora']:.3f} |")
        out.append("")
    if "vce" in results:
        vce = results["vce"]
        out += ["### VCE vs no VCE (same tower, same language recipe)", "",
                "| base | trained projector params | general accuracy | presence probe | defective/ok (adapter) | exact match | "
                "tiny defects found | large defects found |",
                "|---|---|---|---|---|---|---|---|"]
        for arm in ("vce", "no_vce"):
            if arm in vce:
                row = vce[arm]
                out.append(f"| {arm.replace('_', ' ')} | {row['trained_projector_parameters']:,} | {_pm(row['general'])} | "
                           f"{_pm(row['probe_presence'])} | {_pm(row['defective_accuracy'])} | "
                           f"{_pm(row['exact_match'])} | {_pm(row['tiny_defective_accuracy'])} | "
                           f"{_pm(row['large_defective_accuracy'])} |")
        out.append("")
    return "\n".join(out)


# -- driver ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["methods", "internals", "targets", "cost", "vce"],
                        choices=["methods", "internals", "targets", "cost", "vce"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="training steps per mixture adapter")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mixture-train", type=int, default=1200, help="training images of the task mixture")
    parser.add_argument("--eval-per-task", type=int, default=40)
    parser.add_argument("--cost-repeats", type=int, default=7)
    parser.add_argument("--vce-pool", type=int, default=6000)
    parser.add_argument("--language-steps", type=int, default=200)
    parser.add_argument("--general-eval", type=int, default=200)
    parser.add_argument("--inspection-train", type=int, default=600)
    parser.add_argument("--inspection-eval", type=int, default=200)
    parser.add_argument("--inspection-steps", type=int, default=150)
    parser.add_argument("--inspection-lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ablation.json"))
    parser.add_argument("--report", action="store_true", help="print the markdown tables of --out and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(render_markdown(json.loads(args.out.read_text())))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    if args.out.exists():  # parts can be run separately and accumulate in one file
        results = json.loads(args.out.read_text())
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}
    runners = {
        "methods": lambda: run_mixture(args, methods_variants()),
        "internals": lambda: run_mixture(args, internals_variants()),
        "targets": lambda: run_mixture(args, targets_variants()),
        "cost": lambda: run_cost(args),
        "vce": lambda: run_vce(args),
    }
    for part in args.parts:
        t0 = time.perf_counter()
        results[part] = runners[part]()
        results[part]["seconds"] = round(time.perf_counter() - t0, 1)
        results[part]["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log.info("%s done in %.0fs → %s", part, results[part]["seconds"], args.out)
    return results


if __name__ == "__main__":
    main()
