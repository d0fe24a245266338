"""Rendering: determinism and visible, correctly located defects."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from service.world.geometry import cell_pixel_bounds, part_alpha
from service.world.render import render
from service.world.scene import COLOURS, DEFECT_TYPES, sample_scene
from tests.world.helpers import pixel_diff, scenes_with

VISIBLE = 40
"""Minimum channel difference (0-255) at a defect's most changed pixel."""

TINY_MAX_PIXELS = 40


def test_render_is_deterministic() -> None:
    rng = random.Random(0)
    for kind in ("general", "inspection"):
        scene = sample_scene(rng, kind, defect_rate=1.0)
        first, second = render(scene), render(scene)
        assert first.mode == "RGB" and first.size == (96, 96)
        assert first.tobytes() == second.tobytes()
    assert render(scene, 128).size == (128, 128)


def test_lighting_and_seed_change_pixels() -> None:
    scene = sample_scene(random.Random(1), "inspection")
    brighter = dataclasses.replace(scene, lighting=dataclasses.replace(scene.lighting, brightness=1.3))
    assert render(scene).tobytes() != render(brighter).tobytes()
    assert render(scene).tobytes() != render(dataclasses.replace(scene, seed=scene.seed + 1)).tobytes()


def test_parts_show_in_their_cells_in_their_colour() -> None:
    rng = random.Random(4)
    for _ in range(8):
        scene = sample_scene(rng, "general", defect_rate=0.0)
        empty = dataclasses.replace(scene, parts=())
        diff = np.abs(np.asarray(render(scene), np.int16) - np.asarray(render(empty), np.int16)).max(axis=2)
        image = np.asarray(render(scene), np.float32)
        occupied = np.zeros_like(diff, dtype=bool)
        for part in scene.parts:
            x0, y0, x1, y1 = cell_pixel_bounds(part.cell, 96)
            occupied[y0:y1, x0:x1] = True
            assert (diff[y0:y1, x0:x1] > 30).sum() > 60
            solid = part_alpha(part, 96) >= 1.0
            mean = image[solid].mean(axis=0)
            target = np.asarray(COLOURS[scene.colour], np.float32)
            # the part's colour is closest to its own palette entry (up to lighting gain)
            def angle(a: np.ndarray, b: np.ndarray) -> float:
                return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            best = max(COLOURS, key=lambda name: angle(mean, np.asarray(COLOURS[name], np.float32)))
            assert best == scene.colour, (best, scene.colour, mean, target)
        assert not diff[~occupied].any(), "a part or its shadow leaked out of its grid cell"


@pytest.mark.parametrize("kind", ["general", "inspection"])
@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_defect_changes_pixels_only_in_its_cell(defect_type: str, kind: str) -> None:
    for scene in scenes_with(defect_type, kind, n=12, seed=17):
        defect = scene.defect
        assert defect is not None
        diff = pixel_diff(scene)
        ys, xs = np.nonzero(diff)
        assert len(xs) > 0, "the defect did not change any pixel"
        assert diff.max() >= VISIBLE, f"{defect_type} is barely visible (max diff {diff.max()})"
        x0, y0, x1, y1 = cell_pixel_bounds(defect.location, 96)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1, (
            f"{defect_type} changed pixels outside {defect.location}")
        if defect.size_class == "tiny":
            assert len(xs) <= TINY_MAX_PIXELS, f"tiny {defect_type} changed {len(xs)} pixels"
        else:
            assert len(xs) > 20, f"large {defect_type} changed only {len(xs)} pixels"


@pytest.mark.parametrize("defect_type", ["scratch", "crack", "spot", "missing_hole"])
def test_defect_is_drawn_at_its_stated_centre(defect_type: str) -> None:
    for kind in ("general", "inspection"):
        for scene in scenes_with(defect_type, kind, n=10, seed=29):
            defect = scene.defect
            assert defect is not None
            ys, xs = np.nonzero(pixel_diff(scene))
            centre = np.array([defect.x, defect.y]) * 96
            assert np.hypot(*(np.array([xs.mean(), ys.mean()]) + 0.5 - centre)) <= 2.5


@pytest.mark.parametrize("defect_type", ["scratch", "crack", "spot"])
def test_surface_defects_stay_on_the_part(defect_type: str) -> None:
    for kind in ("general", "inspection"):
        for scene in scenes_with(defect_type, kind, n=10, seed=23):
            defect = scene.defect
            assert defect is not None
            solid = part_alpha(scene.parts[defect.part_index], 96) >= 1.0
            changed = pixel_diff(scene) > 0
            assert changed.any() and not (changed & ~solid).any()


def test_scratch_is_thin_and_short() -> None:
    for scene in scenes_with("scratch", "inspection", n=12, seed=31):
        defect = scene.defect
        assert defect is not None and 1 <= defect.width <= 2 and 4 <= defect.length <= 10
        changed = int((pixel_diff(scene) > 0).sum())
        assert changed <= (defect.length + 2) * (defect.width + 1)


@pytest.mark.parametrize("part_type", ["plate", "bracket", "washer", "hex_nut", "gear"])
def test_missing_hole_fills_a_hole(part_type: str) -> None:
    scene = scenes_with("missing_hole", "inspection", n=1, seed=5, part_types=[part_type])[0]
    defect = scene.defect
    assert defect is not None
    image = np.asarray(render(scene), np.float32)
    clean = np.asarray(render(dataclasses.replace(scene, defect=None)), np.float32)
    px, py = int(defect.x * 96), int(defect.y * 96)
    # where the hole would show the dark belt, the part's colour is drawn instead
    assert np.abs(image[py, px] - clean[py, px]).max() > 40


def test_defects_visible_at_other_sizes() -> None:
    for defect_type in DEFECT_TYPES:
        scene = scenes_with(defect_type, "inspection", n=1, seed=8)[0]
        assert pixel_diff(scene, size=192).max() >= VISIBLE
