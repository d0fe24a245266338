"""A mixture of instruction tasks whose answer formats conflict, for the Dual-LoRA ablation.

One adapter must learn all of them at once. They ask about what the demo base's image features
do carry (count, part, colour, position), but each in a format the base was never trained on and
that contradicts the base and the other tasks: the count as a word (``three``) and as a tag
(``n=3``) where the base says ``3``; a caption (``three red gears``) and a ``part/colour`` pair
(``gear/red``) where the base names one attribute; a ``r<row>c<col>`` grid code where the base says
``top-left``; and a yes/no colour check. Defect questions are left out on purpose: the demo base's
features do not carry defects (docs/model-card.md), so they would measure nothing about the adapter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from service.world import COLOURS, GRID_CELLS, PART_NAMES, generate_examples

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class MixtureTask:
    """One task: its phrasings and whether it needs a one-part scene."""

    name: str
    phrasings: tuple[str, ...]
    single_part_only: bool = False


TASKS: tuple[MixtureTask, ...] = (
    MixtureTask("count_word", ("How many parts are there? Answer in words.", "Count the parts and spell the number.")),
    MixtureTask("count_tag", ("Count the parts. Reply as n=<number>.", "Give the part count in the form n=<number>.")),
    MixtureTask("caption", ("Write a short caption of the image.", "Caption this picture in a few words.")),
    MixtureTask("part_colour", ("Give the part and its colour as part/colour.", "Reply with part/colour.")),
    MixtureTask(
        "grid_code",
        ("Which grid cell holds the part? Reply r<row>c<column>.", "Locate the part as r<row>c<column>."),
        single_part_only=True,
    ),
    MixtureTask("colour_check", ("Is there a {colour} part? Answer yes or no.", "Do you see a {colour} part? yes or no.")),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
_BY_NAME = {t.name: t for t in TASKS}


def _plural(name: str, count: int) -> str:
    return name if count == 1 else name + "s"


def task_example(task: str, meta: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """``(instruction, answer)`` of ``task`` for a general scene's ground truth ``meta``."""
    spec = _BY_NAME[task]
    count, colour, part = meta["count"], meta["colour"], PART_NAMES[meta["part_type"]]
    instruction = rng.choice(spec.phrasings)
    if task == "count_word":
        return instruction, NUMBER_WORDS[count]
    if task == "count_tag":
        return instruction, f"n={count}"
    if task == "caption":
        return instruction, f"{NUMBER_WORDS[count]} {colour} {_plural(part, count)}"
    if task == "part_colour":
        return instruction, f"{part}/{colour}"
    if task == "grid_code":
        if count != 1:
            raise ValueError("grid_code needs a one-part scene")
        row, col = divmod(GRID_CELLS.index(meta["positions"][0]), 3)
        return instruction, f"r{row + 1}c{col + 1}"
    if task == "colour_check":
        asked = colour if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != colour])
        return instruction.format(colour=asked), "yes" if asked == colour else "no"
    raise ValueError(f"unknown task {task!r}")


def applicable_tasks(meta: dict[str, Any]) -> tuple[str, ...]:
    return tuple(t.name for t in TASKS if meta["count"] == 1 or not t.single_part_only)


def mixture_examples(n: int, seed: int, size: int = 96) -> list[tuple[Image.Image, dict[str, Any]]]:
    """``n`` rendered general scenes, each with one task drawn uniformly among those that apply.

    Records are ``{"instruction", "answer", "question_type": task, "meta"}`` like the world's.
    """
    rng = random.Random(seed)
    out = []
    for image, record in generate_examples(n, seed, kind="general", size=size):
        meta = record["meta"]
        task = rng.choice(applicable_tasks(meta))
        instruction, answer = task_example(task, meta, rng)
        out.append((image, {"instruction": instruction, "answer": answer, "question_type": task, "meta": meta}))
    return out


def balanced_eval_examples(per_task: int, seed: int, size: int = 96) -> list[tuple[Image.Image, dict[str, Any]]]:
    """``per_task`` held-out examples of every task (the scenes are rendered once and shared)."""
    rng = random.Random(seed)
    n_scenes = per_task * 6  # a quarter of the scenes hold one part; grow until grid_code has enough
    while True:
        scenes = generate_examples(n_scenes, seed, kind="general", size=size)
        singles = [s for s in scenes if s[1]["meta"]["count"] == 1]
        if len(singles) >= per_task:
            break
        n_scenes *= 2
    out = []
    for task in TASKS:
        pool = singles if task.single_part_only else scenes
        for image, record in pool[:per_task]:
            instruction, answer = task_example(task.name, record["meta"], rng)
            out.append((image, {"instruction": instruction, "answer": answer, "question_type": task.name,
                                "meta": record["meta"]}))
    return out
