"""Plain, slow references the model code is checked against."""

from __future__ import annotations

import math

import torch


def naive_ms_deform_attn(
    values: torch.Tensor,
    spatial_shape: tuple[int, int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Per-point loop reference for :func:`ms_deform_attn` (tests only: slow, obviously correct).

    Bilinear interpolation with ``align_corners=False``: normalised x maps to pixel ``x*W - 0.5``;
    taps outside the map contribute zero.
    """
    b, n_levels, _, n_heads, d_head = values.shape
    height, width = spatial_shape
    _, n_queries, _, _, n_points, _ = sampling_locations.shape
    out = torch.zeros(b, n_queries, n_heads, d_head, dtype=values.dtype)
    grid = values.view(b, n_levels, height, width, n_heads, d_head)
    for bi in range(b):
        for q in range(n_queries):
            for h in range(n_heads):
                for lv in range(n_levels):
                    for p in range(n_points):
                        x = float(sampling_locations[bi, q, h, lv, p, 0]) * width - 0.5
                        y = float(sampling_locations[bi, q, h, lv, p, 1]) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d_head, dtype=values.dtype)
                        for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yy < height and 0 <= xx < width:
                                    acc = acc + wy * wx * grid[bi, lv, yy, xx, h]
                        out[bi, q, h] += attention_weights[bi, q, h, lv, p] * acc
    return out.reshape(b, n_queries, n_heads * d_head)
