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
    groups += [(f"{name} only", m) for name, m in sorted(metrics.get("by_defect", {}).items()) if name != "ok"]
    for name, m in groups:
        rows.append(
            f"| {name} | {m['n']} | {_pct(m['defective_accuracy'])} | {_pct(m['type_accuracy'])} | "
            f"{_pct(m['location_accuracy'])} | {_pct(m['exact_match'])} |"
        )
    return rows


def confusion_lines(confusion: dict[str, dict[str, int]]) -> list[str]:
    """A Markdown table: one row per true label (``ok`` first), one column per answered label."""
    true_labels = sorted(confusion, key=lambda label: (label != "ok", label))
    answered = sorted({a for row in confusion.values() for a in row}, key=lambda label: (label != "ok", label))
    rows = [
        "| truth | " + " | ".join(answered) + " | n |",
        "|---|" + "---:|" * (len(answered) + 1),
    ]
    for label in true_labels:
        row = confusion[label]
        rows.append(f"| {label} | " + " | ".join(str(row.get(a, 0)) for a in answered) + f" | {sum(row.values())} |")
    return rows


def stages(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The commands that made the base, oldest first: ``previous`` (or the older ``stage1``) + this one."""
    earlier = list(section.get("previous", []))
    if "stage1" in section:
        earlier.append(section["stage1"])
    return earlier + [section]


# Records written before train_base noted its CPU were all made on the project's first machine.
FIRST_MACHINE = "AMD EPYC, 2 cores"


def _machines(runs: list[dict[str, Any]]) -> str:
    """Which CPU ran which commands: ``"AMD EPYC, 2 cores (commands 1-9) and Intel Xeon, 2 cores (commands 10-11)"``."""
    groups: list[tuple[str, list[int]]] = []
    for i, run in enumerate(runs, start=1):
        cpu = run.get("cpu", FIRST_MACHINE)
        if groups and groups[-1][0] == cpu:
            groups[-1][1].append(i)
        else:
            groups.append((cpu, [i]))
    if len(groups) == 1:
        return groups[0][0]
    return " and ".join(f"{cpu} ({_command_span(ids)})" for cpu, ids in groups)


def _command_span(ids: list[int]) -> str:
    return f"command {ids[0]}" if len(ids) == 1 else f"commands {ids[0]}-{ids[-1]}"


def _with_out(command: str, out: str) -> str:
    """``command`` writing to ``out`` (an intermediate stage writes where the next one reads)."""
    words = command.split()
    if "--out" in words:
        words[words.index("--out") + 1] = out
    return " ".join(words)


def _stage_text(number: int, stage: dict[str, Any], steps_run: dict[str, Any]) -> str:
    """One paragraph on what command ``number`` trains."""
    vision, language = stage["vision"], stage["language"]
    defects = stage.get("defect_pool_images")
    patch_weight = stage.get("defect_patch_weight")
    class_spec = stage.get("defect_class_weights")
    class_weights = (
        "; a defect type's terms weighted by type: " + ", ".join(class_spec.replace("=", " ").split(","))
        if class_spec
        else ""
    )
    head = (
        "a per-patch defect-type head (the patch holding the defect carries its type, every other patch `none`, "
        + (f"the defect patch weighted {patch_weight:g}" if patch_weight else "the defect patch weighted patches / 4")
        + (
            f", plus an image-level defective/ok term weighted {stage['defect_image_weight']:g}"
            if stage.get("defect_image_weight")
            else ""
        )
        + class_weights
        + ")"
    )

    def summary(weight_key: str, where: str) -> str:
        """The clause on a :class:`~service.demo.train_base.DefectSummaryHead` stage term, if it ran."""
        weight = stage.get(weight_key)
        if not weight:
            return ""
        return (
            f", and a throw-away linear head on every {where} that names the close-up's defect type (or `none`) and "
            f"its 3x3 cell (weight {weight:g}"
            + ("; the same per-type weights" if class_spec else "")
            + "), so that each token carries the inspection answer rather than only the one token that holds the defect"
        )

    trains = bool(vision["steps"] or steps_run.get("language_steps_run", language["steps"]))
    reset = (
        (" Finally, the" if trains else " The")
        + f" LM head's rows of the {steps_run.get('output_rows_reset')} tokens that no general answer "
        "uses are re-centred on the rows the answers use, at their spread (`--neutral-output-rows`): trained only as "
        "softmax negatives, they sat so far below the rest that an adapter on the LLM linears could not raise them against "
        "a token the base already emits (see the notes)."
        if stage.get("neutral_output_rows")
        else ""
    )
    if not trains:
        origin = "from scratch" if not stage.get("init_from") else "from the previous command's output"
        return f"{number}. **Command {number}** ({origin}; no training).{reset}"
    language_text = (
        f"language stage ({steps_run.get('language_steps_run', language['steps'])} steps run, batch "
        f"{language['batch']}, AdamW lr {language['lr']}): tower frozen; LLM, VCE attention and MLP projector "
        "trained on the answer tokens of general questions only (`service.model.training.adapter_loss`)"
        + (
            f", plus {head} on the projector output (LLM space) on {stage['defect_batch']} inspection close-ups "
            f"per step (weight {stage['language_defect_weight']}), which keeps in what the LLM reads the defect "
            "signal the tower carries (trained on general answers alone, the projector drops it; see the notes)"
            if stage.get("language_defect_weight")
            else ""
        )
        + summary("language_summary_weight", "projected close-up token")
        + (
            f"; the projector's new position embedding (zero at first, lr {stage.get('position_lr') or language['lr']}, "
            "no weight decay) and, on the general scenes, a throw-away linear head that makes every projected token "
            f"name its own row and column (weight {stage['language_position_weight']:g}), so that the LLM can tell "
            "where on the image a token lies"
            if stage.get("language_position_weight")
            else ""
        )
        + "."
    )
    data = (
        f"{stage['pool_images']} rendered general scenes (world seed {stage['pool_seed']}; 1-4 parts of one type "
        "and colour on a conveyor), questions drawn on the fly (part, colour, count, position; position only for "
        "one-part scenes)"
        + (
            f" and {defects} rendered inspection close-ups (world seed {stage['defect_pool_seed']}, half defective) "
            "with per-patch defect labels"
            if defects
            else ""
        )
    )
    if stage.get("vision_distill_weight"):
        vision_text = (
            f"Tower sharpening ({steps_run.get('vision_final', {}).get('steps', vision['steps'])} steps run, "
            f"AdamW lr {vision['lr']}, warm-up + cosine): the tower continues alone with {head} on "
            f"{stage['defect_batch']} close-ups per step"
            + summary("defect_summary_weight", "patch token")
            + f", while on {vision['batch']} general scenes per step every "
            "hidden state the VCE reads is pulled towards the starting tower's (mean squared error over its "
            f"variance, weight {stage['vision_distill_weight']:g}), so the projector and LLM trained on the old "
            "features stay valid. Then the "
        )
    elif vision["steps"]:
        vision_text = (
            f"Vision stage ({vision['steps']} steps max, batch {vision['batch']}, AdamW lr {vision['lr']}, warm-up + "
            "cosine): the vision tower alone, with throw-away attention-pooling classification heads on the patch "
            "tokens of the projected layer (-2): part type, colour, count, position and a 9-cell occupancy map"
            + (
                f"; plus, on {stage['defect_batch']} inspection close-ups per step, {head} (loss weight "
                f"{stage.get('defect_weight', 1.0)}; the first {stage.get('defect_warmup_steps', 0)} steps train it "
                "alone), so that the features carry 1-2 px defects for a `line-inspection` adapter to read"
                if defects
                else ""
            )
            + ". This is the cheap objective DESIGN.md section 6 asks for; end-to-end training from scratch stays "
            "at chance on shape. Then the "
        )
    else:
        vision_text = "The "
    origin = "from scratch" if not stage.get("init_from") else "from the previous command's output"
    return f"{number}. **Command {number}** ({origin}; data: {data}). {vision_text}{language_text}{reset}"


def _final_statistics(training: dict[str, Any]) -> str:
    """The smoothed end-of-stage figures of the last command that trained anything."""
    runs = stages(training)
    trained = [i for i, run in enumerate(runs) if run.get("vision_final") or run.get("language_steps_run")]
    if not trained:
        return "No command trained anything."
    i = trained[-1]
    which = "the last command" if i == len(runs) - 1 else f"the last command that trained (command {i + 1})"
    parts = [f"vision stage {runs[i]['vision_final']}"] if runs[i].get("vision_final") else ["no vision stage"]
    parts.append(f"language loss {runs[i]['language_final_loss']}")
    return f"Final training statistics of {which} (smoothed): {', '.join(parts)}."


def _recipe_lines(recipe: dict[str, Any], training: dict[str, Any]) -> list[str]:
    chain, runs = stages(recipe), stages(training)
    commands = [
        _with_out(stage["command"], chain[i + 1]["init_from"]) if i + 1 < len(chain) else stage["command"]
        for i, stage in enumerate(chain)
    ]
    lines = [
        f"{len(chain)} command{'s' if len(chain) > 1 else ''}"
        + (", each continuing from the previous one's output (`--init-from`):" if len(chain) > 1 else ":"),
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    for i, (stage, run) in enumerate(zip(chain, runs, strict=False)):
        lines.append(_stage_text(i + 1, stage, run))
    earlier = [run.get("eval_general") for run in runs[:-1]]
    if any(value is not None for value in earlier):
        shown = ", ".join(f"command {i + 1}: {_pct(v)}" for i, v in enumerate(earlier) if v is not None)
        lines += ["", f"Held-out general accuracy after the earlier commands: {shown}."]
    return lines


def render(
    card: dict[str, Any],
    adapter: dict[str, Any] | None = None,
    latency_ms: float | None = None,
    general_more: dict[str, Any] | None = None,
) -> str:
    """The Markdown model card."""
    arch, recipe, training = card["architecture"], card["recipe"], card["training"]
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
        f"{arch['vce']['n_heads']} heads, {arch['vce']['n_points']} points; then the LLaVA 2-layer MLP"
        + (", plus a learned embedding per patch position added to its output (`image_positions`)."
           if arch["vce"].get("image_positions") else "."),
        f"- LLM: Llama, width {p['text_dim']}, {p['text_layers']} layers, {p['text_heads']} heads "
        f"({p['text_kv_heads']} KV heads), FFN {p['text_ffn']}, context {p['max_positions']}.",
        f"- Tokenizer: byte-level BPE ({arch['vocab_size']} tokens) trained on the world's instructions and answers.",
        "",
        "## Recipe",
        "",
        *_recipe_lines(recipe, training),
        "",
        "Saved with `save_base` in float16; the fingerprint above is that of the saved weights loaded in float32.",
        "",
        _final_statistics(training),
        "",
        f"Training time: {sum(run['seconds']['total'] for run in stages(training)) / 60:.1f} min wall in all ("
        + "; ".join(
            f"command {i + 1}: {run['seconds']['total'] / 60:.1f} min, vision {run['seconds']['vision']:.0f} s, "
            f"language {run['seconds']['language']:.0f} s"
            for i, run in enumerate(stages(training))
        )
        + f") on {_machines(stages(training))}, {training['threads']} torch threads, no GPU, shared with other jobs at times.",
        "",
        "## Held-out accuracy",
        "",
        f"`python -m service.demo.evaluate --base service/assets/demo-base --n {general['n']} --seed "
        f"{general['seed']} --kind general` (batched greedy generation; the seed is never used in training):",
        "",
        "| question type | n | accuracy |",
        "|---|---|---|",
    ]
    lines += [*_general_rows(general), ""]
    if general_more:
        lines += [
            f"On a larger held-out set (`--n {general_more['n']} --seed {general_more['seed']}`), where a type's "
            "standard error is under half as large; the ≥ 90 % per type the base must keep is judged here:",
            "",
            "| question type | n | accuracy |",
            "|---|---|---|",
            *_general_rows(general_more),
            "",
        ]
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
            if ev.get("confusion"):
                lines += ["What the adapter calls each image (rows: the truth; columns: the answer's type, "
                          "location ignored):", "", *confusion_lines(ev["confusion"]), ""]
        general_with = adapter.get("eval_general_with_adapter")
        if general_with:
            lines += [f"General accuracy with the adapter applied: {_pct(general_with['accuracy'])}.", ""]
    return "\n".join(lines)


def _general_rows(general: dict[str, Any]) -> list[str]:
    rows = [f"| {qtype} | {row['n']} | {_pct(row['accuracy'])} |" for qtype, row in general["per_type"].items()]
    return [*rows, f"| all | {general['n']} | {_pct(general['accuracy'])} |"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("service/assets/demo-base"))
    parser.add_argument("--adapter-metrics", type=Path, default=None)
    parser.add_argument("--latency-ms", type=float, default=None)
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended as is")
    parser.add_argument("--general-eval", type=Path, default=None,
                        help="a larger general evaluation (the JSON `python -m service.demo.evaluate --n 1000` prints)")
    parser.add_argument("--out", type=Path, default=Path("docs/model-card.md"))
    args = parser.parse_args(argv)
    card = json.loads((args.base / "MODEL_CARD.json").read_text())
    adapter = json.loads(args.adapter_metrics.read_text()) if args.adapter_metrics else None
    general_more = json.loads(args.general_eval.read_text()) if args.general_eval else None
    text = render(card, adapter, args.latency_ms, general_more)
    if args.notes:
        text += "\n" + args.notes.read_text()
    args.out.write_text(text.rstrip() + "\n")


if __name__ == "__main__":
    main()
