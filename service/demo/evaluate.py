"""Held-out evaluation of a base (optionally with an adapter) on the synthetic world.

Usage::

    python -m service.demo.evaluate --base service/assets/demo-base [--adapter DIR] \
        --n 200 --seed 12345 --kind general|inspection

Generates ``n`` examples with a seed the training recipes never use, answers them with batched
greedy :func:`~service.model.generate.generate` and reports

* ``general``: accuracy overall and per question type (part, colour, count, position);
* ``inspection``: defective/ok accuracy, defect-type accuracy and location accuracy (on defective
  images), exact match, the same split by defect size class (``tiny`` / ``large``) and by defect
  type, and a confusion table of true against answered defect type (``ok`` included).

The metric functions (:func:`general_metrics`, :func:`inspection_metrics`) work on plain records
and answer strings, so they are unit-tested without a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from service.model.base import BaseModel, load_base
from service.model.generate import GenerationRequest, ImageFeatureCache, answer_token_budget, generate
from service.model.lora.weights import AdapterWeights
from service.world import generate_examples, inspection_fields

Record = dict[str, Any]
EVAL_LATENCY_SEED = 54321


def _normalise(text: str) -> str:
    return " ".join(str(text).lower().split()).rstrip(".")


def _ratio(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def general_metrics(records: Sequence[Record], predictions: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy (case / spacing / full stop tolerant), overall and per question type."""
    if len(records) != len(predictions):
        raise ValueError("records and predictions differ in length")
    hits: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    for record, pred in zip(records, predictions, strict=True):
        qtype = record["question_type"]
        totals[qtype] += 1
        hits[qtype] += int(_normalise(pred) == _normalise(record["answer"]))
    per_type = {t: {"accuracy": _ratio(hits[t], totals[t]), "n": totals[t]} for t in sorted(totals)}
    return {
        "n": len(records),
        "accuracy": _ratio(sum(hits.values()), len(records)),
        "per_type": per_type,
    }


def _inspection_counts(pairs: Sequence[tuple[Record, str]]) -> dict[str, Any]:
    n = len(pairs)
    defective_ok = exact = 0
    n_defective = type_hits = location_hits = 0
    for record, pred in pairs:
        truth = inspection_fields(record["answer"])
        got = inspection_fields(pred)
        defective_ok += int(got.defective == truth.defective)
        exact += int(got == truth)
        if truth.defective:
            n_defective += 1
            type_hits += int(got.defect_type == truth.defect_type)
            location_hits += int(got.location == truth.location)
    return {
        "n": n,
        "n_defective": n_defective,
        "defective_accuracy": _ratio(defective_ok, n),
        "type_accuracy": _ratio(type_hits, n_defective),
        "location_accuracy": _ratio(location_hits, n_defective),
        "exact_match": _ratio(exact, n),
    }


UNKNOWN_TYPE = "defect, unknown type"
UNPARSED = "unparsed"


def _answered_label(pred: str) -> str:
    """What an answer calls the image: ``ok``, a defect type, :data:`UNKNOWN_TYPE` or :data:`UNPARSED`."""
    got = inspection_fields(pred)
    if got.defective is None:
        return UNPARSED
    if not got.defective:
        return "ok"
    return got.defect_type or UNKNOWN_TYPE


def confusion_table(records: Sequence[Record], predictions: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{true label: {answered label: count}}`` over inspection records; labels are ``ok`` or a
    defect type, answers also :data:`UNKNOWN_TYPE` / :data:`UNPARSED` (location is ignored)."""
    table: dict[str, dict[str, int]] = {}
    for record, pred in zip(records, predictions, strict=True):
        truth = inspection_fields(record["answer"])
        true_label = (truth.defect_type or UNKNOWN_TYPE) if truth.defective else "ok"
        row = table.setdefault(true_label, {})
        answered = _answered_label(pred)
        row[answered] = row.get(answered, 0) + 1
    return {label: dict(sorted(row.items())) for label, row in sorted(table.items())}


def inspection_metrics(records: Sequence[Record], predictions: Sequence[str]) -> dict[str, Any]:
    """Inspection scores overall and by defect size class.

    ``defective_accuracy``: the defective/ok call is right (an unparsable answer is wrong);
    ``type_accuracy`` and ``location_accuracy``: over images that have a defect;
    ``exact_match``: all parsed fields equal (``ok`` for ``ok``). ``by_size`` splits the
    defective images into ``tiny`` and ``large``, ``by_defect`` by their true defect type; both
    report the ok images as ``ok``; ``confusion`` is :func:`confusion_table`.
    """
    if len(records) != len(predictions):
        raise ValueError("records and predictions differ in length")
    pairs = list(zip(records, predictions, strict=True))
    groups: dict[str, list[tuple[Record, str]]] = defaultdict(list)
    by_defect: dict[str, list[tuple[Record, str]]] = defaultdict(list)
    for record, pred in pairs:
        size = (record.get("meta") or {}).get("size_class")
        truth = inspection_fields(record["answer"])
        groups[size if truth.defective and size else ("ok" if not truth.defective else "unknown")].append((record, pred))
        by_defect[(truth.defect_type or "unknown") if truth.defective else "ok"].append((record, pred))
    result = _inspection_counts(pairs)
    result["by_size"] = {name: _inspection_counts(group) for name, group in sorted(groups.items())}
    result["by_defect"] = {name: _inspection_counts(group) for name, group in sorted(by_defect.items())}
    result["confusion"] = confusion_table(records, predictions)
    return result


def answer_all(
    base: BaseModel,
    examples: Sequence[tuple[Any, Record]],
    slot: int = 0,
    batch_size: int = 50,
    max_new_tokens: int | None = None,
    adapter: AdapterWeights | None = None,
    cache: ImageFeatureCache | None = None,
) -> list[str]:
    """Greedy answers of ``base`` to every example, in batches.

    The adapter is the one in ``slot``, or ``adapter`` (a trainable one, on every row) when given;
    ``cache`` reuses image features across calls. ``max_new_tokens`` defaults to what the longest
    reference answer needs (:func:`answer_token_budget`), so no correct answer is cut short.
    """
    if max_new_tokens is None:
        max_new_tokens = answer_token_budget(base, [r["answer"] for _, r in examples])
    answers: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        requests = [
            GenerationRequest(r["instruction"], [im], slot=slot, max_new_tokens=max_new_tokens) for im, r in chunk
        ]
        answers.extend(res.text for res in generate(base, requests, cache=cache, adapter=adapter))
    return answers


def single_request_latency(base: BaseModel, repeats: int = 5, slot: int = 0) -> dict[str, float]:
    """Wall time of one request (one image, a general question) answered alone: median and best, ms."""
    image, record = generate_examples(
        1, EVAL_LATENCY_SEED, kind="general", size=base.model.config.vision_config.image_size
    )[0]
    request = GenerationRequest(record["instruction"], [image], slot=slot, max_new_tokens=12)
    generate(base, [request])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(base, [request])
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": round(times[len(times) // 2], 1), "best_ms": round(times[0], 1)}


def evaluate(
    base: BaseModel, n: int = 200, kind: str = "general", seed: int = 12345, slot: int = 0, batch_size: int = 50
) -> dict[str, Any]:
    """Generate ``n`` held-out examples of ``kind`` and score the base's answers."""
    if kind not in ("general", "inspection"):
        raise ValueError("kind must be 'general' or 'inspection'")
    size = base.model.config.vision_config.image_size
    examples = generate_examples(n, seed, kind=kind, size=size)
    start = time.perf_counter()
    predictions = answer_all(base, examples, slot=slot, batch_size=batch_size)
    seconds = time.perf_counter() - start
    records = [r for _, r in examples]
    metrics = general_metrics(records, predictions) if kind == "general" else inspection_metrics(records, predictions)
    metrics.update({"kind": kind, "seed": seed, "seconds": round(seconds, 2)})
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, default=None, help="adapter directory (save_adapter layout)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--kind", choices=("general", "inspection"), default="general")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the dtype to run in (bfloat16: what a server started with --dtype bfloat16 answers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    slot, n_slots, rank, targets = 0, 0, 64, ["q_proj", "v_proj"]
    if args.adapter is not None:
        adapter_config = json.loads((args.adapter / "adapter_config.json").read_text())
        n_slots, rank, targets = 2, int(adapter_config["r"]), list(adapter_config["target_modules"])
    dtype = getattr(torch, args.dtype)
    base = load_base(args.base, n_slots=n_slots, max_rank=rank, target_modules=targets, dtype=dtype)
    if args.adapter is not None:
        from service.model.lora import load_adapter

        _, weights = load_adapter(args.adapter, base.slots, base_fingerprint=base.fingerprint, dtype=dtype)
        base.slots.load(1, weights)
        slot = 1
    result = evaluate(base, n=args.n, kind=args.kind, seed=args.seed, slot=slot, batch_size=args.batch_size)
    result["dtype"] = str(base.dtype).removeprefix("torch.")  # what the model ran in, not what was asked
    result["latency_one_request"] = single_request_latency(base, slot=slot)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
