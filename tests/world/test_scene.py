"""Scene sampling: structure, grid cells, defect placement, serialisation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from service.world.geometry import GRID_CELLS, cell_of, cell_pixel_bounds, part_alpha, part_holes
from service.world.scene import COLOURS, DEFECT_TYPES, PART_TYPES, Scene, sample_scene


def test_cell_of_grid() -> None:
    assert cell_of(0.1, 0.1) == "top-left"
    assert cell_of(0.5, 0.1) == "top"
    assert cell_of(0.9, 0.5) == "right"
    assert cell_of(0.5, 0.5) == "centre"
    assert cell_of(0.1, 0.9) == "bottom-left"
    assert cell_of(1.0, 1.0) == "bottom-right"
    assert cell_pixel_bounds("bottom", 96) == (32, 64, 64, 96)


def test_general_scenes_structure() -> None:
    rng = random.Random(7)
    counts = set()
    for _ in range(150):
        scene = sample_scene(rng, "general", defect_rate=0.0)
        counts.add(scene.count)
        assert 1 <= scene.count <= 4
        assert len({part.cell for part in scene.parts}) == scene.count
        assert {part.part_type for part in scene.parts} == {scene.part_type}
        assert {part.colour for part in scene.parts} == {scene.colour}
        assert scene.part_type in PART_TYPES and scene.colour in COLOURS
        assert scene.defect is None
        assert scene.position == (scene.parts[0].cell if scene.count == 1 else None)
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("part_type", PART_TYPES)
def test_general_parts_fill_their_own_cell(part_type: str) -> None:
    rng = random.Random(11)
    for _ in range(6):
        scene = sample_scene(rng, "general", defect_rate=0.0, part_types=[part_type])
        for part in scene.parts:
            ys, xs = np.nonzero(part_alpha(part, 96))
            x0, y0, x1, y1 = cell_pixel_bounds(part.cell, 96)
            # inside its cell, with room for the 2 px drop shadow ...
            assert xs.min() >= x0 and xs.max() < x1 - 2 and ys.min() >= y0 and ys.max() < y1 - 2
            # ... and filling a good part of it
            assert xs.max() - xs.min() >= 14 or ys.max() - ys.min() >= 14


def test_inspection_scenes_are_one_large_part() -> None:
    rng = random.Random(3)
    for _ in range(40):
        scene = sample_scene(rng, "inspection")
        assert scene.count == 1 and scene.position == "centre"
        ys, xs = np.nonzero(part_alpha(scene.parts[0], 96))
        assert max(xs.max() - xs.min(), ys.max() - ys.min()) >= 50
        assert len(xs) >= 1500  # a close-up: the part covers a good share of the frame
        assert xs.min() >= 0 and xs.max() <= 95


@pytest.mark.parametrize("kind", ["general", "inspection"])
def test_defect_fields_are_consistent(kind: str) -> None:
    rng = random.Random(5)
    seen = set()
    for _ in range(200):
        scene = sample_scene(rng, kind, defect_rate=1.0)
        defect = scene.defect
        assert defect is not None
        seen.add(defect.defect_type)
        assert 0 <= defect.part_index < scene.count
        assert defect.location in GRID_CELLS
        assert defect.location == cell_of(defect.x, defect.y)
        if defect.defect_type == "missing_hole":
            holes = part_holes(scene.parts[defect.part_index])
            assert defect.hole_index is not None and 0 <= defect.hole_index < len(holes)
        if defect.defect_type in ("scratch", "crack", "spot"):
            assert defect.size_class == "tiny"
        if defect.defect_type == "chip":
            assert defect.size_class == "large"
    assert seen == set(DEFECT_TYPES)


def test_defect_rate_and_types() -> None:
    rng = random.Random(9)
    assert all(sample_scene(rng, "inspection", defect_rate=0.0).defect is None for _ in range(30))
    scenes = [sample_scene(rng, "inspection", defect_rate=0.5) for _ in range(200)]
    rate = sum(scene.defect is not None for scene in scenes) / len(scenes)
    assert 0.35 < rate < 0.65
    only = [sample_scene(rng, "inspection", defect_rate=1.0, defect_types=["crack"]) for _ in range(20)]
    assert {scene.defect.defect_type for scene in only if scene.defect} == {"crack"}


def test_missing_hole_sizes() -> None:
    rng = random.Random(2)
    plate = sample_scene(rng, "inspection", 1.0, defect_types=["missing_hole"], part_types=["plate"])
    washer = sample_scene(rng, "inspection", 1.0, defect_types=["missing_hole"], part_types=["washer"])
    assert plate.defect is not None and plate.defect.size_class == "tiny"
    assert washer.defect is not None and washer.defect.size_class == "large"


def test_sampling_is_deterministic_and_serialisable() -> None:
    first = [sample_scene(random.Random(42), kind) for kind in ("general", "inspection")]
    again = [sample_scene(random.Random(42), kind) for kind in ("general", "inspection")]
    assert first == again
    assert sample_scene(random.Random(43), "general") != first[0]
    for scene in first:
        data = scene.to_dict()
        assert json.loads(json.dumps(data)) == data  # JSON-native values only
        assert Scene.from_dict(json.loads(json.dumps(data))) == scene


def test_invalid_arguments() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError):
        sample_scene(rng, "panorama")
    with pytest.raises(ValueError):
        sample_scene(rng, "general", defect_types=["dent"])
    with pytest.raises(ValueError):
        sample_scene(rng, "general", part_types=["bolt"])
