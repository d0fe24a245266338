"""Geometry shared by scene sampling and rendering.

All scene coordinates are *normalised image coordinates*: ``(0, 0)`` is the
top-left corner of the image and ``(1, 1)`` the bottom-right one, so a scene
can be rendered at any size.  Sizes that only make sense in pixels (a 1-2 px
scratch, a 2 px bolt hole) are given in *reference pixels*, i.e. pixels of a
``REFERENCE_SIZE`` (96 px) render, and scale with the render size.

This module knows how to turn a part into an outline and holes, how to
rasterise a part mask (anti-aliased by supersampling), and how to rasterise a
surface defect (crisp, never anti-aliased, so that a 1 px scratch stays a 1 px
scratch).  It deliberately has no dependency on the scene dataclasses at run
time; it only reads their attributes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from service.world.scene import Defect, Part

REFERENCE_SIZE = 96
"""Image size (px) at which pixel-sized quantities are specified."""

SUPERSAMPLE = 4
"""Supersampling factor used to anti-alias part outlines."""

SMALL_HOLE_PX = 1.5
"""Radius (reference px) of the bolt holes of plates and brackets."""

SHADOW_OFFSET_PX = 2.0
"""Offset (reference px, down and right) of the drop shadow under parts."""

GRID_CELLS: tuple[str, ...] = (
    "top-left",
    "top",
    "top-right",
    "left",
    "centre",
    "right",
    "bottom-left",
    "bottom",
    "bottom-right",
)
"""The coarse 3x3 grid, row by row."""

Point = tuple[float, float]


@dataclass(frozen=True)
class Circle:
    """A circle in normalised image coordinates."""

    x: float
    y: float
    r: float


# --- the 3x3 grid -----------------------------------------------------------


def cell_of(x: float, y: float) -> str:
    """Name of the grid cell that contains the normalised point ``(x, y)``."""
    col = min(max(int(x * 3), 0), 2)
    row = min(max(int(y * 3), 0), 2)
    return GRID_CELLS[row * 3 + col]


def cell_pixel_bounds(cell: str, size: int) -> tuple[int, int, int, int]:
    """Pixel bounds ``(x0, y0, x1, y1)`` (end exclusive) of ``cell`` at ``size``."""
    index = GRID_CELLS.index(cell)
    row, col = divmod(index, 3)
    edges = [round(i * size / 3) for i in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def cell_centre(cell: str) -> Point:
    """Normalised centre of a grid cell."""
    row, col = divmod(GRID_CELLS.index(cell), 3)
    return (col + 0.5) / 3, (row + 0.5) / 3


# --- part shapes (local coordinates, unit radius) ---------------------------

HOLE_FRACTION = {"washer": 0.33, "hex_nut": 0.33, "gear": 0.28}
"""Radius of the central hole, as a fraction of the part radius."""

PLATE_HALF_HEIGHT = 0.66
PLATE_CORNER = 0.15
PLATE_HOLE_SLOTS: tuple[Point, ...] = ((-0.7, -0.36), (0.7, 0.36), (0.7, -0.36), (-0.7, 0.36))
"""Plate hole positions; the first ``n_holes`` are used (2 = a diagonal pair)."""

BRACKET_OUTLINE: tuple[Point, ...] = (
    (-1.0, -1.0),
    (-0.25, -1.0),
    (-0.25, 0.25),
    (1.0, 0.25),
    (1.0, 1.0),
    (-1.0, 1.0),
)
BRACKET_HOLES: tuple[Point, ...] = ((-0.625, -0.55), (0.55, 0.625))

GEAR_TEETH = 10
GEAR_ROOT = 0.8


def _rounded_rectangle(half_w: float, half_h: float, corner: float) -> list[Point]:
    points: list[Point] = []
    centres = ((half_w - corner, -half_h + corner, -90.0), (half_w - corner, half_h - corner, 0.0),
               (-half_w + corner, half_h - corner, 90.0), (-half_w + corner, -half_h + corner, 180.0))
    for cx, cy, start in centres:
        for step in range(4):
            angle = math.radians(start + step * 30.0)
            points.append((cx + corner * math.cos(angle), cy + corner * math.sin(angle)))
    return points


def _gear_outline(teeth: int, root: float) -> list[Point]:
    points: list[Point] = []
    period = 2 * math.pi / teeth
    for i in range(teeth):
        base = i * period
        for frac, radius in ((0.0, root), (0.2, root), (0.32, 1.0), (0.68, 1.0), (0.8, root)):
            angle = base + frac * period
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _hexagon() -> list[Point]:
    return [(math.cos(math.radians(60 * i)), math.sin(math.radians(60 * i))) for i in range(6)]


def local_outline(part_type: str) -> list[Point] | None:
    """Outline polygon of a part type in local unit coordinates (``None`` = unit circle)."""
    if part_type == "washer":
        return None
    if part_type == "hex_nut":
        return _hexagon()
    if part_type == "plate":
        return _rounded_rectangle(1.0, PLATE_HALF_HEIGHT, PLATE_CORNER)
    if part_type == "bracket":
        return list(BRACKET_OUTLINE)
    if part_type == "gear":
        return _gear_outline(GEAR_TEETH, GEAR_ROOT)
    raise ValueError(f"unknown part type {part_type!r}")


def shape_extent(part_type: str) -> float:
    """Largest distance from the part centre to its outline, in part radii."""
    outline = local_outline(part_type)
    if outline is None:
        return 1.0
    return max(math.hypot(x, y) for x, y in outline)


def _to_image(part: Part, u: float, v: float) -> Point:
    angle = math.radians(part.rotation)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return (part.cx + part.radius * (u * cos_a - v * sin_a),
            part.cy + part.radius * (u * sin_a + v * cos_a))


def part_outline(part: Part) -> Circle | list[Point]:
    """The outer outline of ``part`` in normalised image coordinates."""
    outline = local_outline(part.part_type)
    if outline is None:
        return Circle(part.cx, part.cy, part.radius)
    return [_to_image(part, u, v) for u, v in outline]


def part_holes(part: Part) -> list[Circle]:
    """The holes of ``part`` (normalised image coordinates), in a fixed order."""
    small = SMALL_HOLE_PX / REFERENCE_SIZE
    if part.part_type in HOLE_FRACTION:
        return [Circle(part.cx, part.cy, part.radius * HOLE_FRACTION[part.part_type])]
    if part.part_type == "plate":
        slots = PLATE_HOLE_SLOTS[: part.n_holes]
    elif part.part_type == "bracket":
        slots = BRACKET_HOLES
    else:
        raise ValueError(f"unknown part type {part.part_type!r}")
    return [Circle(*_to_image(part, u, v), small) for u, v in slots]


# --- rasterisation ------------------------------------------------------------


def _fill(draw: ImageDraw.ImageDraw, shape: Circle | list[Point], scale: float, value: int) -> None:
    """Fill a circle or polygon given in normalised coordinates on a ``scale`` px canvas."""
    if isinstance(shape, Circle):
        x, y, r = shape.x * scale - 0.5, shape.y * scale - 0.5, shape.r * scale
        draw.ellipse((x - r, y - r, x + r, y + r), fill=value)
    else:
        draw.polygon([(x * scale - 0.5, y * scale - 0.5) for x, y in shape], fill=value)


def part_alpha(part: Part, size: int, defect: Defect | None = None, holes: bool = True) -> np.ndarray:
    """Anti-aliased coverage of ``part`` at ``size`` px, as float32 in ``[0, 1]``.

    ``defect`` (if it belongs to this part) is applied: a ``missing_hole`` leaves
    its hole undrawn, a ``chip`` bites a disc out of the outline.  ``holes=False``
    gives the outline only.
    """
    scale = size * SUPERSAMPLE
    canvas = Image.new("L", (scale, scale), 0)
    draw = ImageDraw.Draw(canvas)
    _fill(draw, part_outline(part), scale, 255)
    if holes:
        for index, hole in enumerate(part_holes(part)):
            if defect is not None and defect.defect_type == "missing_hole" and defect.hole_index == index:
                continue
            _fill(draw, hole, scale, 0)
    if defect is not None and defect.defect_type == "chip":
        _fill(draw, Circle(defect.x, defect.y, defect.length / REFERENCE_SIZE), scale, 0)
    small = canvas.reduce(SUPERSAMPLE)
    return np.asarray(small, dtype=np.float32) / 255.0


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Grey-level erosion with a 3x3 square, ``steps`` times (outside counts as 0)."""
    out = mask
    for _ in range(steps):
        padded = np.pad(out, 1, mode="constant", constant_values=0)
        h, w = out.shape
        out = np.min([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    return out


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Grey-level dilation with a 3x3 square, ``steps`` times."""
    out = mask
    for _ in range(steps):
        padded = np.pad(out, 1, mode="constant", constant_values=0)
        h, w = out.shape
        out = np.max([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    return out


def shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate a 2-D array by whole pixels (right/down positive), filling with 0."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src = image[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def shadow_offset(size: int) -> int:
    """Drop-shadow offset in whole pixels at ``size``."""
    return max(1, round(SHADOW_OFFSET_PX * size / REFERENCE_SIZE))


def crack_points(defect: Defect, size: int) -> list[Point]:
    """Vertices (in PIL pixel coordinates at ``size``) of a crack's jagged polyline."""
    rng = random.Random(defect.seed)
    scale = size / REFERENCE_SIZE
    segments = 3 + rng.randrange(2)
    angle = math.radians(defect.angle)
    along = (math.cos(angle), math.sin(angle))
    across = (-along[1], along[0])
    cx, cy = defect.x * size - 0.5, defect.y * size - 0.5
    points: list[Point] = []
    for k in range(segments + 1):
        t = (k / segments - 0.5) * defect.length * scale
        wobble = 0.0 if k in (0, segments) else rng.uniform(-1.6, 1.6) * scale
        points.append((cx + t * along[0] + wobble * across[0], cy + t * along[1] + wobble * across[1]))
    return points


def surface_defect_layer(defect: Defect, size: int) -> np.ndarray:
    """Coverage (float32 in ``[0, 1]``) of a scratch, crack or spot at ``size`` px.

    Lines are drawn without anti-aliasing so that thin defects keep full
    contrast; the renderer paints the defect colour through this layer.
    """
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    scale = size / REFERENCE_SIZE
    cx, cy = defect.x * size - 0.5, defect.y * size - 0.5
    if defect.defect_type == "scratch":
        half = defect.length * scale / 2
        dx, dy = half * math.cos(math.radians(defect.angle)), half * math.sin(math.radians(defect.angle))
        width = max(1, round(defect.width * scale))
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
    elif defect.defect_type == "crack":
        draw.line(crack_points(defect, size), fill=255, width=max(1, round(scale)))
    elif defect.defect_type == "spot":
        diameter = defect.length * scale
        if diameter >= 4:
            r = diameter / 2
            draw.ellipse((cx - r + 0.5, cy - r + 0.5, cx + r - 0.5, cy + r - 0.5), fill=255)
        else:
            px, py = math.floor(defect.x * size), math.floor(defect.y * size)
            if round(diameter) <= 2:
                draw.rectangle((px, py, px + 1, py + 1), fill=255)
            else:
                draw.rectangle((px - 1, py - 1, px + 1, py + 1), fill=140)
                draw.line([(px - 1, py), (px + 1, py)], fill=255)
                draw.line([(px, py - 1), (px, py + 1)], fill=255)
    else:
        raise ValueError(f"{defect.defect_type!r} is not a surface defect")
    return np.asarray(layer, dtype=np.float32) / 255.0
