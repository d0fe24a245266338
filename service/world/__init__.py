"""A deterministic synthetic "line-inspection world" (PIL + numpy only).

Scenes of manufactured parts on a conveyor belt with known attributes and at
most one defect (:mod:`.scene`), a renderer (:mod:`.render`), question families
with fixed answer formats (:mod:`.questions`) and dataset writers in the upload
format of DESIGN.md section 4 (:mod:`.dataset`).  CLI: ``python -m service.world``.
"""

from service.world.dataset import (
    generate_examples,
    read_dataset,
    summarize,
    write_jsonl_base64,
    write_zip,
)
from service.world.geometry import GRID_CELLS, cell_of
from service.world.questions import (
    QUESTION_TYPES,
    InspectionFields,
    answer_for,
    format_inspection_answer,
    inspection_fields,
    make_example,
)
from service.world.render import render
from service.world.scene import (
    COLOURS,
    DEFECT_TYPES,
    PART_NAMES,
    PART_TYPES,
    Background,
    Defect,
    Lighting,
    Part,
    Scene,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "DEFECT_TYPES",
    "GRID_CELLS",
    "PART_NAMES",
    "PART_TYPES",
    "QUESTION_TYPES",
    "Background",
    "Defect",
    "InspectionFields",
    "Lighting",
    "Part",
    "Scene",
    "answer_for",
    "cell_of",
    "format_inspection_answer",
    "generate_examples",
    "inspection_fields",
    "make_example",
    "read_dataset",
    "render",
    "sample_scene",
    "summarize",
    "write_jsonl_base64",
    "write_zip",
]
