"""Render a :class:`~service.world.scene.Scene` to an RGB image.

The pipeline, in order:

1. conveyor-belt background (texture, tone, tint);
2. a soft drop shadow under every part;
3. the parts, anti-aliased by supersampling, with a light-from-top-left shading
   gradient and darkened edges (holes show the belt through them; a
   ``missing_hole`` or ``chip`` defect changes the part's shape here);
4. a surface defect (``scratch``, ``crack``, ``spot``) painted crisply *after*
   anti-aliasing, through a 0/1 layer clipped to fully covered part pixels, so
   a 1 px scratch keeps full contrast and never lands off the part;
5. lighting jitter and a little sensor noise, applied per pixel.

Everything is a pure function of the scene (noise is seeded by ``scene.seed``),
so the same scene always gives the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from service.world.geometry import REFERENCE_SIZE, erode, part_alpha, shadow_offset, shift, surface_defect_layer
from service.world.scene import COLOURS, SURFACE_DEFECTS, Background, Lighting, Part, Scene

SHADOW_STRENGTH = 0.45
SHADING_STRENGTH = 0.14
EDGE_DARKENING = 0.35


def luminance(rgb: tuple[int, int, int]) -> float:
    """Rec. 601 luma of an RGB triple."""
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def defect_colour(defect_type: str, part_rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """Colour of a surface defect, chosen to contrast with the part colour.

    Scratches are shiny on dark parts and dark on light ones; cracks are a much
    darker version of the part colour; spots are dark grime on light parts and
    pale dust on dark ones.
    """
    light = luminance(part_rgb) >= 140
    if defect_type == "scratch":
        return (38.0, 36.0, 34.0) if light else (242.0, 242.0, 236.0)
    if defect_type == "crack":
        r, g, b = part_rgb
        return (0.22 * r, 0.22 * g, 0.22 * b)
    if defect_type == "spot":
        return (52.0, 40.0, 28.0) if luminance(part_rgb) >= 110 else (232.0, 222.0, 190.0)
    raise ValueError(f"{defect_type!r} is not a surface defect")


def _coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` in pixels, each of shape ``(size, size)``."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(axis, axis)


def _background(background: Background, seed: int, size: int) -> np.ndarray:
    """The belt, as float32 ``(size, size, 3)``."""
    x, y = _coordinates(size)
    scale = size / REFERENCE_SIZE
    period = max(2.0, background.period * scale)
    tone = np.full((size, size), float(background.tone), dtype=np.float32)
    tone += 6.0 * (y / size - 0.5)  # a hint of perspective: the far edge is darker
    if background.texture == "ribbed":
        tone -= 10.0 * ((x % period) < max(1.0, scale))
    elif background.texture == "mesh":
        tone -= 8.0 * (((x % period) < max(1.0, scale)) | ((y % period) < max(1.0, scale)))
    elif background.texture == "speckled":
        rng = np.random.default_rng([seed, 1])
        tone += rng.normal(0.0, 5.0, size=(size, size)).astype(np.float32)
    elif background.texture != "plain":
        raise ValueError(f"unknown texture {background.texture!r}")
    tint = np.asarray(background.tint, dtype=np.float32)
    return tone[:, :, None] + tint[None, None, :]


def _part_colour(part: Part, alpha: np.ndarray, size: int) -> np.ndarray:
    """Shaded colour of ``part`` everywhere (only meaningful where ``alpha > 0``)."""
    x, y = _coordinates(size)
    radius = max(part.radius * size, 1.0)
    # +1 at the top-left of the part, -1 at the bottom-right.
    ramp = np.clip(((part.cx * size - x) + (part.cy * size - y)) / (radius * math.sqrt(2)), -1.0, 1.0)
    shade = 1.0 + SHADING_STRENGTH * ramp
    edge = alpha - erode(alpha, 1)
    shade = shade * (1.0 - EDGE_DARKENING * edge)
    base = np.asarray(COLOURS[part.colour], dtype=np.float32)
    return shade[:, :, None] * base[None, None, :]


def _apply_lighting(image: np.ndarray, lighting: Lighting, seed: int) -> np.ndarray:
    size = image.shape[0]
    x, y = _coordinates(size)
    angle = math.radians(lighting.gradient_angle)
    ramp = ((x / size - 0.5) * math.cos(angle) + (y / size - 0.5) * math.sin(angle)) * 2.0
    gain = lighting.brightness * (1.0 + lighting.gradient * ramp)
    out = ((image - 128.0) * lighting.contrast + 128.0) * gain[:, :, None]
    if lighting.noise > 0:
        rng = np.random.default_rng([seed, 2])
        out = out + rng.normal(0.0, lighting.noise, size=out.shape).astype(np.float32)
    return out


def render(scene: Scene, size: int = REFERENCE_SIZE) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image (deterministic)."""
    if size < 24:
        raise ValueError("size must be at least 24 px")
    image = _background(scene.background, scene.seed, size)
    defect = scene.defect
    alphas = [
        part_alpha(part, size, defect if defect is not None and defect.part_index == index else None)
        for index, part in enumerate(scene.parts)
    ]
    coverage = np.clip(np.sum(alphas, axis=0), 0.0, 1.0) if alphas else np.zeros((size, size), np.float32)
    offset = shadow_offset(size)
    shadow = shift(coverage, offset, offset)
    image = image * (1.0 - SHADOW_STRENGTH * shadow)[:, :, None]
    for part, alpha in zip(scene.parts, alphas, strict=True):
        image = image * (1.0 - alpha[:, :, None]) + _part_colour(part, alpha, size) * alpha[:, :, None]
    if defect is not None and defect.defect_type in SURFACE_DEFECTS:
        layer = surface_defect_layer(defect, size) * (alphas[defect.part_index] >= 1.0)
        colour = np.asarray(defect_colour(defect.defect_type, COLOURS[scene.colour]), dtype=np.float32)
        image = image * (1.0 - layer[:, :, None]) + colour[None, None, :] * layer[:, :, None]
    image = _apply_lighting(image, scene.lighting, scene.seed)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)
