"""Scene descriptions for the synthetic line-inspection world, and a sampler.

A :class:`Scene` is a complete, render-independent description of one image:
a conveyor-belt background, lighting, 1-4 identical parts and at most one
defect.  Coordinates are normalised to ``[0, 1]`` (see
:mod:`service.world.geometry`), so the same scene renders at any size.

Two kinds of scene are sampled:

* ``"general"``: 1-4 parts of one type and colour, each filling its own cell of
  the 3x3 grid (``top-left`` ... ``bottom-right``).
* ``"inspection"``: a close-up of exactly one large part, roughly centred and
  spanning most of the frame; the defect location is the grid cell of the
  *image* that contains the defect centre, so it is never ambiguous.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.world.geometry import (
    GRID_CELLS,
    REFERENCE_SIZE,
    SHADOW_OFFSET_PX,
    cell_centre,
    cell_of,
    cell_pixel_bounds,
    dilate,
    erode,
    part_alpha,
    part_holes,
    shadow_offset,
    shape_extent,
    shift,
    surface_defect_layer,
)

PART_TYPES: tuple[str, ...] = ("washer", "hex_nut", "plate", "bracket", "gear")
PART_NAMES: dict[str, str] = {
    "washer": "washer",
    "hex_nut": "hex nut",
    "plate": "plate",
    "bracket": "bracket",
    "gear": "gear",
}
"""Natural-language name of each part type (used in answers)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 48, 42),
    "blue": (48, 98, 212),
    "green": (46, 158, 72),
    "yellow": (232, 200, 44),
    "grey": (162, 163, 168),
    "orange": (236, 128, 30),
    "purple": (136, 72, 184),
}

TEXTURES: tuple[str, ...] = ("plain", "ribbed", "mesh", "speckled")
BELT_TINTS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (-4, 0, 6), (5, 2, -4), (-2, 5, -2))

DEFECT_TYPES: tuple[str, ...] = ("scratch", "crack", "spot", "missing_hole", "chip")
SURFACE_DEFECTS: tuple[str, ...] = ("scratch", "crack", "spot")
SIZE_CLASSES: tuple[str, ...] = ("tiny", "large")
TINY_HOLE_PX = 3.0
"""A missing hole of at most this radius (reference px) counts as a tiny defect."""

SCENE_KINDS: tuple[str, ...] = ("general", "inspection")

_TRIES_PER_CELL = 12


@dataclass(frozen=True)
class Background:
    """The conveyor belt: a texture drawn in a grey ``tone`` with a colour ``tint``."""

    texture: str
    tone: int
    tint: tuple[int, int, int]
    period: int


@dataclass(frozen=True)
class Lighting:
    """Global lighting jitter, applied per pixel after everything is drawn.

    ``out = ((in - 128) * contrast + 128) * brightness * (1 + gradient * ramp) + noise``
    where ``ramp`` runs from -1 to 1 across the image along ``gradient_angle``
    (degrees) and ``noise`` is Gaussian with standard deviation ``noise``.
    """

    brightness: float
    contrast: float
    gradient: float
    gradient_angle: float
    noise: float


@dataclass(frozen=True)
class Part:
    """One part: centre ``(cx, cy)`` and ``radius`` are normalised; ``rotation`` in degrees.

    ``cell`` is the grid cell the part sits in; ``n_holes`` matters for plates only.
    """

    part_type: str
    colour: str
    cell: str
    cx: float
    cy: float
    radius: float
    rotation: float
    n_holes: int


@dataclass(frozen=True)
class Defect:
    """At most one defect per scene, on ``parts[part_index]``.

    ``(x, y)`` is the defect centre (normalised) and ``location`` the grid cell
    containing it.  The meaning of the size fields depends on the type:

    * ``scratch``: a straight line ``length`` reference px long, ``width`` 1-2 px,
      at ``angle`` degrees.
    * ``crack``: a jagged 1 px polyline ``length`` px long at ``angle``; ``seed``
      fixes the jaggedness.
    * ``spot``: a dot ``length`` (2-3) px across.
    * ``missing_hole``: hole ``hole_index`` of the part is not drawn; ``length`` is
      its radius in reference px.
    * ``chip``: a disc of radius ``length`` px centred on the outline is bitten out.
    """

    defect_type: str
    part_index: int
    location: str
    x: float
    y: float
    length: float
    width: int = 1
    angle: float = 0.0
    hole_index: int | None = None
    seed: int = 0

    @property
    def size_class(self) -> str:
        """``"tiny"`` (a few pixels) or ``"large"``."""
        if self.defect_type in SURFACE_DEFECTS:
            return "tiny"
        if self.defect_type == "missing_hole" and self.length <= TINY_HOLE_PX:
            return "tiny"
        return "large"


@dataclass(frozen=True)
class Scene:
    """A complete scene.  ``seed`` drives the pixel noise and speckle texture."""

    kind: str
    background: Background
    lighting: Lighting
    parts: tuple[Part, ...]
    defect: Defect | None
    seed: int

    @property
    def part_type(self) -> str:
        """The (shared) part type."""
        return self.parts[0].part_type

    @property
    def colour(self) -> str:
        """The (shared) colour name."""
        return self.parts[0].colour

    @property
    def count(self) -> int:
        """Number of parts."""
        return len(self.parts)

    @property
    def position(self) -> str | None:
        """Grid cell of the part when there is exactly one, else ``None``."""
        return self.parts[0].cell if len(self.parts) == 1 else None

    def summary(self) -> dict[str, Any]:
        """Ground-truth attributes, as JSON-friendly values."""
        defect = self.defect
        return {
            "kind": self.kind,
            "part_type": self.part_type,
            "colour": self.colour,
            "count": self.count,
            "positions": [part.cell for part in self.parts],
            "defect": defect.defect_type if defect else None,
            "defect_location": defect.location if defect else None,
            "size_class": defect.size_class if defect else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """Full description as plain JSON-friendly data (inverse of :meth:`from_dict`)."""
        data = asdict(self)
        data["background"]["tint"] = list(self.background.tint)
        data["parts"] = list(data["parts"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Rebuild a scene from :meth:`to_dict` output (lists or tuples accepted)."""
        background = dict(data["background"])
        background["tint"] = tuple(background["tint"])
        defect = data.get("defect")
        return cls(
            kind=data["kind"],
            background=Background(**background),
            lighting=Lighting(**data["lighting"]),
            parts=tuple(Part(**part) for part in data["parts"]),
            defect=Defect(**defect) if defect else None,
            seed=int(data["seed"]),
        )


# --- sampling -----------------------------------------------------------------


def _sample_general_parts(rng: random.Random, part_type: str, colour: str, n_holes: int) -> tuple[Part, ...]:
    count = rng.randint(1, 4)
    cells = sorted(rng.sample(GRID_CELLS, count), key=GRID_CELLS.index)
    extent = shape_extent(part_type)
    half_cell = 1 / 6
    parts = []
    for cell in cells:
        radius = half_cell * rng.uniform(0.72, 0.82) / extent
        # Keep the part and its drop shadow (plus a pixel) inside the cell.
        slack = max(0.0, half_cell - radius * extent - (SHADOW_OFFSET_PX + 1) / REFERENCE_SIZE)
        centre_x, centre_y = cell_centre(cell)
        parts.append(Part(
            part_type=part_type,
            colour=colour,
            cell=cell,
            cx=round(centre_x + rng.uniform(-slack, slack), 4),
            cy=round(centre_y + rng.uniform(-slack, slack), 4),
            radius=round(radius, 4),
            rotation=round(rng.uniform(0, 360), 2),
            n_holes=n_holes,
        ))
    return tuple(parts)


def _sample_inspection_part(rng: random.Random, part_type: str, colour: str, n_holes: int) -> Part:
    extent = shape_extent(part_type)
    return Part(
        part_type=part_type,
        colour=colour,
        cell="centre",
        cx=round(0.5 + rng.uniform(-0.008, 0.008), 4),
        cy=round(0.5 + rng.uniform(-0.008, 0.008), 4),
        radius=round(rng.uniform(0.36, 0.42) / extent, 4),
        rotation=round(rng.uniform(0, 360), 2),
        n_holes=n_holes,
    )


def _inside_cell(mask: np.ndarray, cell: str) -> bool:
    """True when every set pixel of the reference-size ``mask`` lies in ``cell``."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return False
    x0, y0, x1, y1 = cell_pixel_bounds(cell, mask.shape[0])
    return bool(xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1)


def _pixel_centre(px: int, py: int) -> tuple[float, float]:
    return (px + 0.5) / REFERENCE_SIZE, (py + 0.5) / REFERENCE_SIZE


def _candidates_by_cell(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel coordinates ``(x, y)`` of ``mask``, grouped by grid cell (grid order)."""
    ys, xs = np.nonzero(mask)
    groups: dict[str, np.ndarray] = {}
    for cell in GRID_CELLS:
        x0, y0, x1, y1 = cell_pixel_bounds(cell, mask.shape[0])
        keep = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        if keep.any():
            groups[cell] = np.stack([xs[keep], ys[keep]], axis=1)
    return groups


def _place_by_cell(
    rng: random.Random,
    groups: dict[str, np.ndarray],
    build: Callable[[int, int], Defect | None],
) -> Defect | None:
    """Try to place a defect, choosing its grid cell uniformly among feasible cells.

    A cell is drawn uniformly from ``groups``; up to ``_TRIES_PER_CELL`` random
    candidate pixels in it are passed to ``build`` (which returns a valid defect
    or ``None``).  A cell where nothing fits is dropped and another one drawn, so
    hard-to-fit cells are not under-represented.
    """
    cells = list(groups)
    while cells:
        cell = rng.choice(cells)
        pixels = groups[cell]
        for _ in range(_TRIES_PER_CELL):
            px, py = pixels[rng.randrange(len(pixels))]
            defect = build(int(px), int(py))
            if defect is not None:
                return defect
        cells.remove(cell)
    return None


def mask_defect_footprint(part: Part, defect: Defect, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Pixels a ``missing_hole`` or ``chip`` can change at ``size``, as a bool mask.

    Mirrors the renderer: the part's coverage changes, its drop shadow changes
    where it is visible, and the edge shading spreads changes by one pixel.
    """
    with_defect = part_alpha(part, size, defect)
    without = part_alpha(part, size)
    offset = shadow_offset(size)
    changed = with_defect != without
    shadow_changed = shift(with_defect, offset, offset) != shift(without, offset, offset)
    visible = (with_defect < 1.0) | (without < 1.0)
    footprint = changed | (shadow_changed & visible)
    return dilate(footprint.astype(np.uint8), 1).astype(bool)


def _place_surface(rng: random.Random, defect_type: str, part: Part, part_index: int) -> Defect | None:
    opaque = (part_alpha(part, REFERENCE_SIZE) >= 1.0).astype(np.uint8)
    allowed = erode(opaque, 1).astype(bool)

    def build(px: int, py: int) -> Defect | None:
        x, y = _pixel_centre(px, py)
        location = cell_of(x, y)
        if defect_type == "scratch":
            defect = Defect("scratch", part_index, location, x, y, length=float(rng.randint(4, 10)),
                            width=rng.choice((1, 1, 2)), angle=round(rng.uniform(0, 180), 1))
        elif defect_type == "crack":
            defect = Defect("crack", part_index, location, x, y, length=float(rng.randint(6, 11)),
                            angle=round(rng.uniform(0, 180), 1), seed=rng.getrandbits(31))
        else:
            defect = Defect("spot", part_index, location, x, y, length=float(rng.choice((2, 3))))
        layer = surface_defect_layer(defect, REFERENCE_SIZE) > 0
        if layer.any() and not (layer & ~allowed).any() and _inside_cell(layer, location):
            return defect
        return None

    return _place_by_cell(rng, _candidates_by_cell(erode(opaque, 2)), build)


def _place_missing_hole(rng: random.Random, part: Part, part_index: int) -> Defect | None:
    candidates = []
    for index, hole in enumerate(part_holes(part)):
        defect = Defect("missing_hole", part_index, cell_of(hole.x, hole.y), hole.x, hole.y,
                        length=round(hole.r * REFERENCE_SIZE, 3), hole_index=index)
        if _inside_cell(mask_defect_footprint(part, defect), defect.location):
            candidates.append(defect)
    return rng.choice(candidates) if candidates else None


def _place_chip(rng: random.Random, part: Part, part_index: int) -> Defect | None:
    outer = part_alpha(part, REFERENCE_SIZE, holes=False) >= 1.0
    boundary = outer & ~erode(outer.astype(np.uint8), 1).astype(bool)
    max_radius = min(6.0, max(3.0, 0.42 * part.radius * REFERENCE_SIZE))
    holes = part_holes(part)

    def build(px: int, py: int) -> Defect | None:
        x, y = _pixel_centre(px, py)
        length = round(rng.uniform(3.0, max_radius), 2)
        reach = (length + 1.5) / REFERENCE_SIZE
        if any(math.hypot(x - hole.x, y - hole.y) < reach + hole.r for hole in holes):
            return None  # a chip must not break into a hole
        defect = Defect("chip", part_index, cell_of(x, y), x, y, length=length)
        return defect if _inside_cell(mask_defect_footprint(part, defect), defect.location) else None

    return _place_by_cell(rng, _candidates_by_cell(boundary), build)


def _sample_defect(rng: random.Random, parts: Sequence[Part], defect_types: Sequence[str]) -> Defect | None:
    """Place one defect of a random allowed type on a random part, or ``None`` if none fits."""
    part_index = rng.randrange(len(parts))
    part = parts[part_index]
    remaining = list(defect_types)
    while remaining:
        defect_type = rng.choice(remaining)
        if defect_type in SURFACE_DEFECTS:
            defect = _place_surface(rng, defect_type, part, part_index)
        elif defect_type == "missing_hole":
            defect = _place_missing_hole(rng, part, part_index)
        else:
            defect = _place_chip(rng, part, part_index)
        if defect is not None:
            return defect
        remaining.remove(defect_type)
    return None


def sample_scene(
    rng: random.Random,
    kind: str = "general",
    defect_rate: float = 0.5,
    defect_types: Sequence[str] | None = None,
    part_types: Sequence[str] | None = None,
) -> Scene:
    """Draw one scene from ``rng``.

    ``kind`` is ``"general"`` (1-4 parts on the 3x3 grid) or ``"inspection"``
    (one large part).  With probability ``defect_rate`` the scene gets one
    defect of a type drawn uniformly from ``defect_types`` (default: all) among
    those that fit the part (e.g. ``missing_hole`` needs a hole whose removal
    stays inside one grid cell).  ``part_types`` restricts the part types.
    The result depends only on the state of ``rng``.
    """
    if kind not in SCENE_KINDS:
        raise ValueError(f"kind must be one of {SCENE_KINDS}, got {kind!r}")
    types = tuple(defect_types) if defect_types is not None else DEFECT_TYPES
    unknown = set(types) - set(DEFECT_TYPES)
    if unknown:
        raise ValueError(f"unknown defect types: {sorted(unknown)}")
    choices = tuple(part_types) if part_types is not None else PART_TYPES
    if not choices or set(choices) - set(PART_TYPES):
        raise ValueError(f"part_types must be a non-empty subset of {PART_TYPES}")

    background = Background(
        texture=rng.choice(TEXTURES),
        tone=rng.randint(42, 88),
        tint=rng.choice(BELT_TINTS),
        period=rng.randint(4, 7),
    )
    lighting = Lighting(
        brightness=round(rng.uniform(0.86, 1.14), 3),
        contrast=round(rng.uniform(0.86, 1.14), 3),
        gradient=round(rng.uniform(0.0, 0.1), 3),
        gradient_angle=round(rng.uniform(0, 360), 1),
        noise=round(rng.uniform(0.0, 2.0), 2),
    )
    part_type = rng.choice(choices)
    colour = rng.choice(list(COLOURS))
    n_holes = rng.randint(2, 4)
    if kind == "inspection":
        parts: tuple[Part, ...] = (_sample_inspection_part(rng, part_type, colour, n_holes),)
    else:
        parts = _sample_general_parts(rng, part_type, colour, n_holes)
    defect = None
    if types and rng.random() < defect_rate:
        defect = _sample_defect(rng, parts, types)
    return Scene(kind, background, lighting, parts, defect, seed=rng.getrandbits(31))
