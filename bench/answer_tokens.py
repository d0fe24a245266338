"""Which answer tokens can an adapter not make likely? Teacher-forced token probabilities per defect type.

An adapter on the LLM linears leaves the LM head as the base trained it. A token that no general
answer uses was trained only as a softmax negative, and may stay out of reach. This script shows
it directly: for held-out inspection images of each defect type, it feeds the true answer
(``defect: scratch, top-left``) and reports the probability the base + adapter give each answer
token at its position (mean over the images), and how often the token that *names the type*
(the first one where this type's answer differs from every other type's) is the most likely one.
It also lists the answer tokens that no general answer uses (the rows ``train_base
--neutral-output-rows`` re-centres).

    python bench/answer_tokens.py --base service/assets/demo-base --adapter /tmp/li --out bench/results/answer_tokens.json

Written up in docs/model-card.md (notes).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from service.demo.data import EVAL_SEED  # noqa: E402
from service.model.base import BaseModel, load_base  # noqa: E402
from service.model.generate import answer_token_ids, embed_prompts, left_padded_positions  # noqa: E402
from service.model.lora import load_adapter  # noqa: E402
from service.model.lora.context import adapter_batch  # noqa: E402
from service.model.training import TrainingExample, build_batch  # noqa: E402
from service.world import DEFECT_TYPES, generate_examples  # noqa: E402
from service.world.questions import format_inspection_answer  # noqa: E402


def naming_position(base: BaseModel, defect_type: str) -> int:
    """Index (in the answer's tokens) of the first token where this type's answer differs from all others'."""
    own = answer_token_ids(base, format_inspection_answer(defect_type, "top-left"))
    others = [answer_token_ids(base, format_inspection_answer(t, "top-left")) for t in DEFECT_TYPES if t != defect_type]
    for k in range(len(own)):
        if all(len(o) <= k or o[: k + 1] != own[: k + 1] for o in others):
            return k
    raise ValueError(f"{defect_type}'s answer is a prefix of another type's")


def token_probabilities(base: BaseModel, slot_adapter, image, instruction: str, answer: str) -> torch.Tensor:
    """``[len(answer tokens)]``: the probability of each true answer token given the ones before."""
    batch = build_batch(base, [TrainingExample(instruction, answer, [image])])
    features = [list(base.encode_images(base.preprocess_images([image])))]
    embeds, mask = embed_prompts(base, batch.token_rows, features)
    positions = left_padded_positions(mask)
    with adapter_batch(trainable=slot_adapter):
        logits = base.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[0]
    n = len(answer_token_ids(base, answer))
    ids = torch.tensor(batch.token_rows[0][-n - 1 :])  # the answer and EOS
    return logits[-n - 2 : -1].softmax(-1).gather(-1, ids[:, None])[:, 0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("service/assets/demo-base"))
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--n", type=int, default=600, help="held-out inspection images to draw (seed 12345)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_grad_enabled(False)

    config = json.loads((args.adapter / "adapter_config.json").read_text())
    base = load_base(args.base, n_slots=1, max_rank=int(config["r"]), target_modules=list(config["target_modules"]))
    _, weights = load_adapter(args.adapter, base.slots, base_fingerprint=base.fingerprint)
    weights.eval()
    tokens = base.tokenizer.convert_ids_to_tokens

    general_vocab = {base.tokenizer.eos_token_id}
    for _, record in generate_examples(2000, 777, kind="general", size=32):
        general_vocab.update(answer_token_ids(base, record["answer"]))

    by_type: dict[str, list[torch.Tensor]] = defaultdict(list)
    for image, record in generate_examples(args.n, EVAL_SEED, kind="inspection"):
        defect = record["meta"]["scene"]["defect"]
        name = defect["defect_type"] if defect else "ok"
        by_type[name].append(token_probabilities(base, weights, image, record["instruction"], record["answer"]))

    result: dict[str, Any] = {"base": base.fingerprint, "adapter": str(args.adapter), "n": args.n,
                              "machine": {"platform": platform.platform(), "torch": torch.__version__}, "types": {}}
    inspection_vocab = set()
    for name in ("ok", *DEFECT_TYPES):
        rows = by_type.get(name)
        if not rows:
            continue
        answer = "ok" if name == "ok" else format_inspection_answer(name, "top-left")
        ids = answer_token_ids(base, answer)
        inspection_vocab.update(ids)
        # answers differ in length by location; the type part is the same for every location
        k = 0 if name == "ok" else naming_position(base, name)
        named = torch.stack([p[k] for p in rows])
        prefix = torch.stack([p[: k + 1] for p in rows]).mean(0)
        result["types"][name] = {
            "images": len(rows),
            "answer_tokens": tokens(ids[: k + 1]),
            "mean_probability": [round(v, 3) for v in prefix.tolist()],
            "naming_token": tokens([ids[k]])[0],
            "naming_token_in_general_answers": ids[k] in general_vocab,
            "naming_token_mean_probability": round(named.mean().item(), 3),
            "naming_token_above_half": round((named > 0.5).float().mean().item(), 3),
        }
        print(f"{name:13s} n={len(rows):3d} naming token {tokens([ids[k]])[0]!r:8s} "
              f"(general answers use it: {ids[k] in general_vocab}) mean p {named.mean():.3f}; "
              f"per token {list(zip(tokens(ids[: k + 1]), [round(v, 2) for v in prefix.tolist()], strict=True))}")
    result["inspection_tokens_no_general_answer_uses"] = sorted(tokens(sorted(inspection_vocab - general_vocab)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
