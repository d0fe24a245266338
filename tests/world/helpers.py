"""Shared helpers for the line-inspection world tests."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from service.world.render import render
from service.world.scene import Scene, sample_scene


def scenes_with(defect_type: str, kind: str, n: int, seed: int = 0,
                part_types: Sequence[str] | None = None) -> list[Scene]:
    """``n`` scenes that carry a defect of ``defect_type``."""
    rng = random.Random(seed)
    found: list[Scene] = []
    for _ in range(n * 20):
        scene = sample_scene(rng, kind, defect_rate=1.0, defect_types=[defect_type], part_types=part_types)
        if scene.defect is not None:
            found.append(scene)
            if len(found) == n:
                return found
    raise AssertionError(f"could not sample {n} {kind} scenes with a {defect_type}")


def pixel_diff(scene: Scene, size: int = 96) -> np.ndarray:
    """Per-pixel max channel difference between ``scene`` and the same scene without its defect."""
    with_defect = np.asarray(render(scene, size), dtype=np.int16)
    without = np.asarray(render(dataclasses.replace(scene, defect=None), size), dtype=np.int16)
    return np.abs(with_defect - without).max(axis=2)
