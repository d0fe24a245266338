"""The conflicting-task mixture of the ablation: answers follow the ground truth in each task's format."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from service.demo.mixture import TASK_NAMES, applicable_tasks, balanced_eval_examples, mixture_examples, task_example

META = {"count": 3, "colour": "red", "part_type": "hex_nut", "positions": ["top-left", "centre", "bottom"]}
SINGLE = {"count": 1, "colour": "blue", "part_type": "gear", "positions": ["right"]}


@pytest.mark.parametrize(
    ("task", "meta", "answer"),
    [
        ("count_word", META, "three"),
        ("count_tag", META, "n=3"),
        ("caption", META, "three red hex nuts"),
        ("caption", SINGLE, "one blue gear"),
        ("part_colour", META, "hex nut/red"),
        ("grid_code", SINGLE, "r2c3"),
    ],
)
def test_answers_in_each_format(task, meta, answer):
    instruction, got = task_example(task, meta, random.Random(0))
    assert got == answer
    assert instruction


def test_colour_check_asks_both_ways_and_answers_truthfully():
    rng = random.Random(1)
    seen = Counter()
    for _ in range(200):
        instruction, answer = task_example("colour_check", SINGLE, rng)
        asked_true = " blue " in instruction
        assert answer == ("yes" if asked_true else "no")
        seen[answer] += 1
    assert 70 < seen["yes"] < 130


def test_grid_code_needs_one_part():
    assert "grid_code" not in applicable_tasks(META)
    assert "grid_code" in applicable_tasks(SINGLE)
    with pytest.raises(ValueError):
        task_example("grid_code", META, random.Random(0))


def test_mixture_is_deterministic_and_covers_every_task():
    a = mixture_examples(60, seed=7, size=48)
    b = mixture_examples(60, seed=7, size=48)
    assert [r for _, r in a] == [r for _, r in b]
    assert {r["question_type"] for _, r in a} == set(TASK_NAMES)
    for _, record in a:
        _, answer = task_example(record["question_type"], record["meta"], random.Random(0))
        if record["question_type"] != "colour_check":  # the asked colour is random
            assert record["answer"] == answer


def test_balanced_eval_has_every_task_equally():
    examples = balanced_eval_examples(5, seed=3, size=48)
    assert Counter(r["question_type"] for _, r in examples) == dict.fromkeys(TASK_NAMES, 5)
    assert all(r["meta"]["count"] == 1 for _, r in examples if r["question_type"] == "grid_code")
