"""VCE — Visual Cue Enhancement projector (arXiv 2411.12787, section 3.1).

Multi-level deformable cross-attention (Deformable-DETR's MSDeformAttn) from a high-level *anchor*
vision feature map to several *reference* maps of the same vision tower, added back to the anchor
as a residual, followed by the usual LLaVA MLP projector.

Sampling is plain PyTorch (``torch.nn.functional.grid_sample``) so it runs on any device.
The output projection of the attention is zero-initialised: a freshly attached VCE is an identity
and leaves a pretrained LLaVA unchanged until it is trained.

Two defects of the official code are deliberately *not* copied: there the anchor is the shallowest
selected layer (a list-order bug) and a final LayerNorm is computed and then discarded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VCEConfig:
    """Configuration of the VCE projector.

    ``feature_layers[0]`` is the anchor (the layer LLaVA normally projects, ``-2``); every entry,
    the anchor included, is a value level the anchor attends to.
    """

    feature_layers: list[int] = field(
        default_factory=lambda: [-2, -8, -14, -20],
        metadata={"help": "vision-tower hidden-state indices; the first is the anchor"},
    )
    n_heads: int = field(default=16, metadata={"help": "attention heads (must divide the vision width)"})
    n_points: int = field(default=4, metadata={"help": "sampling points per head per level"})
    image_positions: bool = field(
        default=False,
        metadata={
            "help": "add a learned, zero-initialised embedding per patch position to the projector output, so "
            "the LLM can tell where on the image a token lies (its RoPE positions are relative to a prompt of "
            "varying length); off for a stock LLaVA, whose vision tower carries position itself"
        },
    )

    @property
    def n_levels(self) -> int:
        return len(self.feature_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VCEConfig:
        return cls(
            feature_layers=[int(i) for i in data["feature_layers"]],
            n_heads=int(data["n_heads"]),
            n_points=int(data["n_points"]),
            image_positions=bool(data.get("image_positions", False)),
        )

    @classmethod
    def for_depth(cls, num_hidden_layers: int, n_heads: int = 16, n_points: int = 4, n_levels: int = 4) -> VCEConfig:
        """Anchor ``-2`` plus references spread evenly over the tower.

        For a 24-layer CLIP-L this gives the official ``[-2, -8, -14, -20]``.
        ``hidden_states`` has ``num_hidden_layers + 1`` entries (embeddings first); valid negative
        indices are ``-1 .. -(num_hidden_layers + 1)``.
        """
        if num_hidden_layers < 2:
            raise ValueError("VCE needs a vision tower with at least 2 layers")
        n_levels = max(1, min(n_levels, num_hidden_layers - 1))
        # The stride that gives the official CLIP-L choice (24 // 4 = 6) on any depth.
        step = max(1, num_hidden_layers // n_levels)
        layers = [-(2 + i * step) for i in range(n_levels)]
        return cls(layers, n_heads, n_points)


def grid_centres(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Normalised (x, y) centres of an H×W patch grid in [0, 1]; shape ``[H*W, 2]`` row-major."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def ms_deform_attn(
    values: torch.Tensor,
    spatial_shape: tuple[int, int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention core in plain PyTorch.

    Args:
        values: ``[B, L, H*W, n_heads, d_head]`` value maps (all levels share one H×W grid).
        spatial_shape: ``(H, W)``.
        sampling_locations: ``[B, Q, n_heads, L, P, 2]`` normalised (x, y) in [0, 1].
        attention_weights: ``[B, Q, n_heads, L, P]`` (softmax over L·P already applied).

    Returns:
        ``[B, Q, n_heads * d_head]``.

    Bilinear sampling uses ``align_corners=False`` and zero padding, as Deformable-DETR does.
    """
    b, n_levels, hw, n_heads, d_head = values.shape
    height, width = spatial_shape
    _, n_queries, _, _, n_points, _ = sampling_locations.shape
    # grid_sample wants [N, C, H, W] inputs and grids in [-1, 1].
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level in range(n_levels):
        v = values[:, level].permute(0, 2, 3, 1).reshape(b * n_heads, d_head, height, width)
        g = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(b * n_heads, n_queries, n_points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*heads, d_head, Q, L, P]
    stacked = torch.stack(sampled, dim=-2)
    w = attention_weights.permute(0, 2, 1, 3, 4).reshape(b * n_heads, 1, n_queries, n_levels, n_points)
    out = (stacked * w).sum(dim=(-2, -1))  # [B*heads, d_head, Q]
    return out.reshape(b, n_heads * d_head, n_queries).transpose(1, 2).contiguous()


class MultiLevelDeformableAttention(nn.Module):
    """MSDeformAttn with all levels on one patch grid and queries at the grid centres."""

    def __init__(self, dim: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.dim, self.n_levels, self.n_heads, self.n_points = dim, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation, except ``output_proj`` which is zero (identity VCE)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, levels: torch.Tensor, spatial_shape: tuple[int, int]) -> torch.Tensor:
        """``query``: ``[B, Q, d]`` with Q = H·W; ``levels``: ``[B, L, H*W, d]`` → ``[B, Q, d]``."""
        b, n_queries, _ = query.shape
        height, width = spatial_shape
        d_head = self.dim // self.n_heads
        values = self.value_proj(levels).view(b, self.n_levels, height * width, self.n_heads, d_head)
        offsets = self.sampling_offsets(query).view(b, n_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, n_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, n_queries, self.n_heads, self.n_levels, self.n_points)
        reference = grid_centres(height, width, device=query.device, dtype=query.dtype)
        normaliser = torch.tensor([width, height], device=query.device, dtype=query.dtype)
        locations = reference[None, :, None, None, None, :] + offsets / normaliser
        return self.output_proj(ms_deform_attn(values, spatial_shape, locations, weights))


class VCEProjector(nn.Module):
    """VCE attention + residual, then the LLaVA MLP projector it wraps.

    Input: the concatenation along channels of the selected vision levels, as transformers'
    ``LlavaModel.get_image_features`` produces when ``vision_feature_layer`` is a list:
    ``[N_img, H*W, L*d_vision]`` (anchor first, CLS already dropped). Output: ``[N_img, H*W, d_llm]``.

    With ``config.image_positions`` a learned ``[H*W, d_llm]`` embedding (zero at first, so still an
    identity) is added to the output; ``n_tokens`` (H·W) and ``out_dim`` (d_llm) size it.
    """

    def __init__(self, config: VCEConfig, vision_dim: int, mlp: nn.Module, n_tokens: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        self.config = config
        self.vision_dim = vision_dim
        self.query_norm = nn.LayerNorm(vision_dim)
        self.value_norm = nn.LayerNorm(vision_dim)
        self.attention = MultiLevelDeformableAttention(vision_dim, config.n_levels, config.n_heads, config.n_points)
        self.mlp = mlp
        self.position_embedding: nn.Parameter | None = None
        if config.image_positions:
            if n_tokens is None or out_dim is None:
                raise ValueError("image_positions needs n_tokens and out_dim")
            self.add_image_positions(n_tokens, out_dim)

    def add_image_positions(self, n_tokens: int, out_dim: int) -> None:
        """Give the projector a zero ``[n_tokens, out_dim]`` position embedding (outputs unchanged until trained)."""
        if self.position_embedding is not None:
            raise ValueError("this projector already has image positions")
        reference = self.attention.output_proj.weight  # device, dtype and trainability of the projector
        self.position_embedding = nn.Parameter(
            torch.zeros(n_tokens, out_dim, device=reference.device, dtype=reference.dtype),
            requires_grad=reference.requires_grad,
        )
        self.config.image_positions = True

    def enhance(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, HW, L*d]`` levels → ``[N, HW, d]`` enhanced anchor (before the MLP)."""
        n, hw, _ = features.shape
        side = math.isqrt(hw)
        if side * side != hw:
            raise ValueError(f"VCE expects a square patch grid, got {hw} patches")
        levels = features.view(n, hw, self.config.n_levels, self.vision_dim).transpose(1, 2)
        anchor = levels[:, 0]
        attended = self.attention(self.query_norm(anchor), self.value_norm(levels), (side, side))
        return anchor + attended

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.enhance(features))
        if self.position_embedding is not None:
            if out.shape[-2] != self.position_embedding.shape[0]:
                raise ValueError(f"{out.shape[-2]} image tokens, but position embeddings for "
                                 f"{self.position_embedding.shape[0]}")
            out = out + self.position_embedding
        return out
