"""Question families, phrasings and the inspection answer format."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from service.world.geometry import GRID_CELLS
from service.world.questions import (
    GENERAL_QUESTION_TYPES,
    PHRASINGS,
    QUESTION_TYPES,
    InspectionFields,
    answer_for,
    format_inspection_answer,
    inspection_fields,
    make_example,
)
from service.world.scene import COLOURS, DEFECT_TYPES, PART_NAMES, sample_scene

ANSWER_RE = re.compile(r"^(ok|defect: [a-z_]+, [a-z-]+)$")


def test_every_question_type_has_at_least_three_phrasings() -> None:
    assert set(PHRASINGS) == set(QUESTION_TYPES)
    for question_type, table in PHRASINGS.items():
        for number, templates in table.items():
            assert len(set(templates)) >= 3, (question_type, number)


def test_general_answers_match_the_scene() -> None:
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        scene = sample_scene(rng, "general")
        example = make_example(rng, scene, "general")
        assert set(example) == {"instruction", "answer", "question_type"}
        question_type, answer = example["question_type"], example["answer"]
        seen.add(question_type)
        assert question_type in GENERAL_QUESTION_TYPES
        if question_type == "part":
            assert answer == PART_NAMES[scene.part_type]
        elif question_type == "colour":
            assert answer == scene.colour and answer in COLOURS
        elif question_type == "count":
            assert answer.isdigit() and len(answer) == 1 and int(answer) == scene.count
        else:
            assert scene.count == 1 and answer == scene.parts[0].cell and answer in GRID_CELLS
        number = "one" if scene.count == 1 else "many"
        table = PHRASINGS[question_type]
        assert example["instruction"] in table.get("any", table.get(number, ()))
    assert seen == set(GENERAL_QUESTION_TYPES)


def test_position_only_for_single_parts() -> None:
    rng = random.Random(1)
    scene = next(s for s in (sample_scene(rng, "general") for _ in range(100)) if s.count > 1)
    with pytest.raises(ValueError):
        answer_for(scene, "position")
    with pytest.raises(ValueError):
        make_example(rng, scene, "position")
    with pytest.raises(ValueError):
        make_example(rng, scene, "trivia")


def test_specific_families_force_the_question_type() -> None:
    rng = random.Random(2)
    scene = sample_scene(rng, "general")
    for question_type in ("part", "colour", "count"):
        assert make_example(rng, scene, question_type)["question_type"] == question_type


def test_inspection_answers() -> None:
    rng = random.Random(3)
    instructions = set()
    for _ in range(200):
        scene = sample_scene(rng, "inspection")
        example = make_example(rng, scene, "inspection")
        instructions.add(example["instruction"])
        assert example["question_type"] == "inspection"
        assert ANSWER_RE.match(example["answer"]), example["answer"]
        fields = inspection_fields(example["answer"])
        if scene.defect is None:
            assert example["answer"] == "ok" and fields == (False, None, None)
        else:
            assert example["answer"] == f"defect: {scene.defect.defect_type}, {scene.defect.location}"
            assert fields == (True, scene.defect.defect_type, scene.defect.location)
    assert len(instructions) >= 3


@pytest.mark.parametrize(("defect_type", "location"), itertools.product(DEFECT_TYPES, GRID_CELLS))
def test_format_round_trips(defect_type: str, location: str) -> None:
    answer = format_inspection_answer(defect_type, location)
    assert answer == f"defect: {defect_type}, {location}"
    assert inspection_fields(answer) == InspectionFields(True, defect_type, location)
    assert inspection_fields(f"  {answer.upper()}  ") == (True, defect_type, location)


def test_format_ok_and_invalid() -> None:
    assert format_inspection_answer(None) == "ok"
    assert inspection_fields(format_inspection_answer(None)) == (False, None, None)
    with pytest.raises(ValueError):
        format_inspection_answer("dent", "top")
    with pytest.raises(ValueError):
        format_inspection_answer("scratch", "upper-left")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ok", (False, None, None)),
        ("  OK. ", (False, None, None)),
        ("Okay", (False, None, None)),
        ("defect: scratch, top-left", (True, "scratch", "top-left")),
        ("  DEFECT :  Scratch ,   Top-Left  ", (True, "scratch", "top-left")),
        ("defect:crack,centre", (True, "crack", "centre")),
        ("Defect: missing hole, bottom right.", (True, "missing_hole", "bottom-right")),
        ("defect: missing-hole, top_left", (True, "missing_hole", "top-left")),
        ("defect: chip, center", (True, "chip", "centre")),
        ("defect: spot", (True, "spot", None)),
        ("defect: banana, top", (True, None, "top")),
        ("defect: scratch, upper left", (True, "scratch", None)),
        ("", (None, None, None)),
        ("the part looks fine to me", (None, None, None)),
        ("scratch, top-left", (None, None, None)),
        ("ok defect: scratch, top", (None, None, None)),
    ],
)
def test_inspection_fields_tolerance(text: str, expected: tuple) -> None:
    assert inspection_fields(text) == expected
