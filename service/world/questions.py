"""Question families, instruction phrasings and answer formats.

General questions (any scene):

* ``part``: the part type in words, e.g. ``"washer"``, ``"hex nut"``;
* ``colour``: the colour name, e.g. ``"red"``;
* ``count``: the number of parts as one digit, e.g. ``"3"``;
* ``position``: the grid cell of the part, e.g. ``"top-left"`` (only asked when
  there is exactly one part).

Inspection (one family, ``inspection``): the answer is exactly
``"defect: <type>, <location>"`` (e.g. ``"defect: scratch, top-left"``) or
``"ok"``.  :func:`inspection_fields` parses such an answer back.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

from service.world.geometry import GRID_CELLS
from service.world.scene import DEFECT_TYPES, PART_NAMES, Scene

GENERAL_QUESTION_TYPES: tuple[str, ...] = ("part", "colour", "count", "position")
QUESTION_TYPES: tuple[str, ...] = (*GENERAL_QUESTION_TYPES, "inspection")
FAMILIES: tuple[str, ...] = ("general", "inspection")
OK_ANSWER = "ok"

PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "part": {
        "one": (
            "What part is this?",
            "What kind of part is on the conveyor?",
            "Name the type of part shown.",
            "Which part is on the belt?",
        ),
        "many": (
            "What parts are these?",
            "What kind of parts are on the conveyor?",
            "Name the type of part shown.",
            "Which part type is on the belt?",
        ),
    },
    "colour": {
        "one": (
            "What colour is the part?",
            "What color is the part on the conveyor?",
            "Which colour is this part?",
            "Name the colour of the part.",
        ),
        "many": (
            "What colour are the parts?",
            "What color are the parts on the conveyor?",
            "Which colour are these parts?",
            "Name the colour of the parts.",
        ),
    },
    "count": {
        "any": (
            "How many parts are there?",
            "How many parts are on the conveyor?",
            "Count the parts on the belt.",
            "What is the number of parts in the image?",
        ),
    },
    "position": {
        "one": (
            "Where is the part?",
            "Where on the belt is the part located?",
            "In which region of the image is the part?",
            "Give the position of the part.",
        ),
    },
    "inspection": {
        "any": (
            "Inspect this part. Is it defective? Where?",
            "Is this part defective? If so, what is the defect and where is it?",
            "Check the part for defects and report the defect type and location.",
            "Quality check: report any defect with its type and location, or say ok.",
            "Is there a scratch, crack, spot, missing hole or chip on this part? Where?",
        ),
    },
}
"""Instruction templates per question type, keyed by grammatical number."""


class InspectionFields(NamedTuple):
    """Parsed inspection answer; every field is ``None`` when it could not be read."""

    defective: bool | None
    defect_type: str | None
    location: str | None


def format_inspection_answer(defect_type: str | None, location: str | None = None) -> str:
    """``"defect: <type>, <location>"``, or ``"ok"`` when ``defect_type`` is ``None``."""
    if defect_type is None:
        return OK_ANSWER
    if defect_type not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect_type!r}")
    if location not in GRID_CELLS:
        raise ValueError(f"unknown location {location!r}")
    return f"defect: {defect_type}, {location}"


_DEFECT_RE = re.compile(r"^defect\s*:\s*(?P<type>[a-z_\- ]+?)\s*(?:,\s*(?P<location>[a-z_\- ]+?))?\s*$")
_LOCATION_ALIASES = {"center": "centre", "middle": "centre", "mid": "centre"}


def _normalise_type(text: str) -> str | None:
    name = re.sub(r"[\s\-]+", "_", text.strip())
    return name if name in DEFECT_TYPES else None


def _normalise_location(text: str | None) -> str | None:
    if text is None:
        return None
    name = re.sub(r"[\s_\-]+", "-", text.strip())
    name = _LOCATION_ALIASES.get(name, name)
    return name if name in GRID_CELLS else None


def inspection_fields(answer: str) -> InspectionFields:
    """Parse an inspection answer into ``(defective, defect_type, location)``.

    Tolerant to case, surrounding whitespace, a trailing full stop, spaces
    instead of ``_``/``-`` (``"missing hole"``, ``"top left"``) and ``center``.
    ``"ok"`` gives ``(False, None, None)``; ``"defect: scratch, top-left"`` gives
    ``(True, "scratch", "top-left")``; a ``defect:`` answer whose type or location
    is unknown keeps ``defective=True`` with ``None`` for that field; anything
    else gives ``(None, None, None)``.
    """
    text = " ".join(str(answer).lower().split()).rstrip(".")
    if text in ("ok", "okay"):
        return InspectionFields(False, None, None)
    match = _DEFECT_RE.match(text)
    if match is None:
        return InspectionFields(None, None, None)
    return InspectionFields(True, _normalise_type(match["type"]), _normalise_location(match["location"]))


def applicable_question_types(scene: Scene) -> tuple[str, ...]:
    """General question types that make sense for ``scene`` (``position`` needs one part)."""
    if scene.count == 1:
        return GENERAL_QUESTION_TYPES
    return tuple(t for t in GENERAL_QUESTION_TYPES if t != "position")


def answer_for(scene: Scene, question_type: str) -> str:
    """The ground-truth answer of ``question_type`` for ``scene``."""
    if question_type == "part":
        return PART_NAMES[scene.part_type]
    if question_type == "colour":
        return scene.colour
    if question_type == "count":
        return str(scene.count)
    if question_type == "position":
        if scene.position is None:
            raise ValueError("position is only defined for scenes with exactly one part")
        return scene.position
    if question_type == "inspection":
        defect = scene.defect
        return format_inspection_answer(defect.defect_type, defect.location) if defect else OK_ANSWER
    raise ValueError(f"unknown question type {question_type!r}")


def phrasings(question_type: str, count: int = 1) -> tuple[str, ...]:
    """Instruction templates for ``question_type`` about a scene with ``count`` parts."""
    table = PHRASINGS[question_type]
    if "any" in table:
        return table["any"]
    return table["one"] if count == 1 else table["many"]


def make_example(rng: random.Random, scene: Scene, family: str) -> dict[str, str]:
    """One instruction/answer pair about ``scene``.

    ``family`` is ``"general"`` (a random applicable general question type),
    ``"inspection"``, or one specific question type from ``QUESTION_TYPES``.
    Returns ``{"instruction", "answer", "question_type"}``.
    """
    if family == "general":
        question_type = rng.choice(applicable_question_types(scene))
    elif family in QUESTION_TYPES:
        question_type = family
    else:
        raise ValueError(f"family must be one of {FAMILIES + QUESTION_TYPES}, got {family!r}")
    answer = answer_for(scene, question_type)
    instruction = rng.choice(phrasings(question_type, scene.count))
    return {"instruction": instruction, "answer": answer, "question_type": question_type}
