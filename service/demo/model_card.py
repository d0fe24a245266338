"""Render ``docs/model-card.md`` from ``service/assets/demo-base/MODEL_CARD.json``.

Usage::

    python -m service.demo.model_card [--base service/assets/demo-base] [--adapter-metrics DIR/metrics.json] \
        [--latency-ms 40] [--notes notes.md] [--out docs/model-card.md]

The numbers in the Markdown card are the ones measured by the recipe (and, if given, by the adapter
fine-tuning run), so the card and the JSON never disagree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _inspection_table(metrics: dict[str, Any]) -> list[str]:
    rows = [
        "| split | n | defective/ok | defect type | location | exact match |",
        "|---|---|---|---|---|---|",
    ]
    groups = [("all", metrics)] + sorted(metrics.get("by_size", {}).items())
    for name, m in groups:
        rows.append(
            f"| {name} | {m['n']} | {_pct(m['defective_accuracy'])} | {_pct(m['type_accuracy'])} | "
            f"{_pct(m['location_accuracy'])} | {_pct(m['exact_match'])} |"
        )
    return rows


def render(card: dict[str, Any], adapter: dict[str, Any] | None = None, latency_ms: float | None = None) -> str:
    """The Markdown model card."""
    arch, recipe, training = card["architecture"], card["recipe"], card["training"]
    stage1 = recipe.get("stage1", recipe)  # a one-command recipe is its own first stage
    p = arch["preset"]
    general = card["eval"]["general"]
    lines = [
        "# Model card: `demo-base`",
        "",
        "The project's own small LLaVA-architecture base (ViT vision tower, VCE projector, small Llama",
        "LLM), trained from scratch on the synthetic line-inspection world (`service/world`). It is the",
        "embedded default model of DESIGN.md section 6; the artifact lives in `service/assets/demo-base/`",
        "and loads with `service.model.base.load_base` (float32 or any other dtype).",
        "",
        f"- Fingerprint: `{card['fingerprint']}`",
        f"- Artifact size: {card['artifact_bytes'] / 1e6:.1f} MB (weights stored in {recipe['saved_dtype']})",
        f"- Parameters: {arch['parameters'] / 1e6:.2f} M",
        "",
        "## Architecture",
        "",
        f"- Vision tower: CLIP-style ViT, {p['image_size']} px input, patch {p['patch_size']} "
        f"({arch['tokens_per_image']} image tokens), width {p['vision_dim']}, {p['vision_layers']} layers, "
        f"{p['vision_heads']} heads.",
        f"- VCE projector: anchor layer {arch['vce']['feature_layers'][0]}, levels {arch['vce']['feature_layers']}, "
        f"{arch['vce']['n_heads']} heads, {arch['vce']['n_points']} points; then the LLaVA 2-layer MLP.",
        f"- LLM: Llama, width {p['text_dim']}, {p['text_layers']} layers, {p['text_heads']} heads "
        f"({p['text_kv_heads']} KV heads), FFN {p['text_ffn']}, context {p['max_positions']}.",
        f"- Tokenizer: byte-level BPE ({arch['vocab_size']} tokens) trained on the world's instructions and answers.",
        "",
        "## Recipe",
        "",
        *(
            [
                "Two commands: the first trains from scratch (stages 1 and 2), the second continues stage 2 from its",
                "output with a defect-preserving head on the projector (stage 3).",
                "",
                "```",
                stage1["command"],
                recipe["command"],
                "```",
            ]
            if "stage1" in recipe
            else ["```", recipe["command"], "```"]
        ),
        "",
        f"Seed {recipe['seed']}. Data: {stage1['pool_images']} rendered *general* scenes (world seed "
        f"{stage1['pool_seed']}; 1-4 parts of one type and colour on a conveyor), questions drawn on the fly "
        "(part, colour, count, position; position only for one-part scenes)."
        + (
            f" The vision stage also sees {stage1['defect_pool_images']} rendered inspection close-ups (world seed "
            f"{stage1['defect_pool_seed']}, half defective) with per-patch defect labels; no inspection *question* "
            "is ever trained, so the base cannot answer one."
            if stage1.get("defect_pool_images")
            else " No inspection data is used."
        ),
        "",
        f"1. Vision stage ({stage1['vision']['steps']} steps max, batch {stage1['vision']['batch']}, AdamW "
        f"lr {stage1['vision']['lr']}, warm-up + cosine): the vision tower alone, with throw-away attention-pooling "
        "classification heads on the patch tokens of the projected layer (-2): part type, colour, count, position "
        "and a 9-cell occupancy map"
        + (
            f"; plus, on {stage1['defect_batch']} inspection close-ups per step, a per-patch defect-type head "
            "(the patch holding the defect carries its type, every other patch `none`, the defect patch weighted "
            f"up; loss weight {stage1.get('defect_weight', 1.0)}; the first {stage1.get('defect_warmup_steps', 0)} "
            "steps train it alone), so that the features carry 1-2 px defects for a `line-inspection` adapter to read"
            if stage1.get("defect_pool_images")
            else ""
        )
        + ". This is the cheap objective DESIGN.md section 6 asks for; end-to-end "
        "training from scratch stays at chance on shape.",
        f"2. Language stage ({training.get('stage1', training).get('language_steps_run', stage1['language']['steps'])} "
        f"steps run, batch {stage1['language']['batch']}, AdamW lr {stage1['language']['lr']}): tower frozen; LLM, "
        "VCE attention and MLP projector trained on the answer tokens only (`service.model.training.adapter_loss`).",
        *(
            [
                f"3. Defect-preserving continuation ({recipe['language']['steps']} steps max, batch "
                f"{recipe['language']['batch']}, AdamW lr {recipe['language']['lr']}): stage 2 again, plus a throw-away "
                f"per-patch defect head on the projector output (LLM space) on {recipe['defect_batch']} inspection "
                f"close-ups per step (weight {recipe['language_defect_weight']}). Trained on general answers alone, "
                "the projector had dropped the defect signal the tower carries (see the notes); the LLM still never "
                "sees an inspection question.",
            ]
            if "stage1" in recipe
            else []
        ),
        "",
        "Saved with `save_base` in float16; the fingerprint above is that of the saved weights loaded in float32.",
        "",
        f"Final training statistics (smoothed): vision stage {training['vision_final']}, language loss "
        f"{training['language_final_loss']}.",
        "",
        f"Training time: {training['seconds']['total'] / 60:.1f} min wall "
        f"(vision {training['seconds']['vision']:.0f} s, language {training['seconds']['language']:.0f} s, data and "
        f"setup {training['seconds']['data_and_setup']:.0f} s) on a 2-core x86_64 CPU (AMD EPYC, "
        f"{training['threads']} torch threads, no GPU), shared with other jobs at times.",
        "",
        "## Held-out accuracy",
        "",
        f"`python -m service.demo.evaluate --base service/assets/demo-base --n {general['n']} --seed "
        f"{general['seed']} --kind general` (batched greedy generation; the seed is never used in training):",
        "",
        "| question type | n | accuracy |",
        "|---|---|---|",
    ]
    for qtype, row in general["per_type"].items():
        lines.append(f"| {qtype} | {row['n']} | {_pct(row['accuracy'])} |")
    lines += [f"| all | {general['n']} | {_pct(general['accuracy'])} |", ""]
    inspection = card["eval"].get("inspection")
    if inspection:
        lines += [
            "Inspection questions (`--kind inspection`), which the base was never trained on, so it is expected near",
            "chance (it answers with a general-question answer, which parses as neither `ok` nor a defect):",
            "",
            *_inspection_table(inspection),
            "",
        ]
    if latency_ms is not None:
        lines += [f"Latency of one request alone (one image, greedy, float32, 2 CPU cores): {latency_ms:.0f} ms.", ""]
    if adapter:
        ev = adapter.get("eval_inspection")
        lines += [
            "## Demo adapter `line-inspection`",
            "",
            f"`python -m service.demo.finetune_adapter` — {adapter['method']} r={adapter['rank']} "
            f"alpha={adapter['alpha']} on {', '.join(adapter['targets'])}; {adapter['n_train']} rendered inspection "
            f"images (world seed {adapter['train_seed']}), {adapter['epochs']} epochs ({adapter['steps']} steps), "
            f"{adapter['train_seconds']:.0f} s; final train loss {adapter['final_train_loss']}.",
            "",
        ]
        if ev:
            lines += ["Held-out inspection (seed 12345) with the adapter:", "", *_inspection_table(ev), ""]
        general_with = adapter.get("eval_general_with_adapter")
        if general_with:
            lines += [f"General accuracy with the adapter applied: {_pct(general_with['accuracy'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("service/assets/demo-base"))
    parser.add_argument("--adapter-metrics", type=Path, default=None)
    parser.add_argument("--latency-ms", type=float, default=None)
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended as is")
    parser.add_argument("--out", type=Path, default=Path("docs/model-card.md"))
    args = parser.parse_args(argv)
    card = json.loads((args.base / "MODEL_CARD.json").read_text())
    adapter = json.loads(args.adapter_metrics.read_text()) if args.adapter_metrics else None
    text = render(card, adapter, args.latency_ms)
    if args.notes:
        text += "\n" + args.notes.read_text()
    args.out.write_text(text.rstrip() + "\n")


if __name__ == "__main__":
    main()
