"""Mean attention distance per head and layer, in pixels (the ViT paper's Fig. 7, right).

For each query patch: sum over key patches of attention weight x pixel distance between the two
patch centres. The class token is left out as query and as key, and each query's weights are
renormalised over the patch keys (so a head that mostly attends to the class token still reports
where its patch attention goes). Averaged over queries and images -> (depth, heads). It is the
transformer's "receptive field size": small in early layers for some heads, global for others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.capture import capture_attention
from vitviz.explain.layout import check_images, token_layout

__all__ = ["attention_distance", "mean_attention_distance", "patch_distances"]


def patch_distances(grid: tuple[int, int], cell: tuple[int, int] | int) -> torch.Tensor:
    """Pixel distance between every pair of patch centres, (P, P) with P = gh * gw (row-major)."""
    ch, cw = (cell, cell) if isinstance(cell, int) else cell
    rows = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1]) * ch  # (P,)
    cols = torch.arange(grid[1], dtype=torch.float64).repeat(grid[0]) * cw  # (P,)
    dy = rows[:, None] - rows[None, :]  # (P, P); centre offsets cancel in differences
    dx = cols[:, None] - cols[None, :]
    return torch.sqrt(dy**2 + dx**2)


def _per_image(attentions: Sequence[torch.Tensor], grid: tuple[int, int], cell: tuple[int, int] | int,
               num_prefix_tokens: int) -> torch.Tensor:
    """Mean distance per image, layer and head: (B, depth, heads), float64."""
    if not attentions:
        raise ExplainError("no attention layers were given.")
    p = grid[0] * grid[1]
    dist = None
    out = []
    for a in attentions:
        if a.ndim != 4 or a.shape[-1] != num_prefix_tokens + p:
            raise ExplainError(f"attention of shape {tuple(a.shape)} does not match a {grid[0]}x{grid[1]} grid "
                               f"plus {num_prefix_tokens} prefix tokens.")
        if dist is None:
            dist = patch_distances(grid, cell).to(a.device)  # (P, P)
        w = a[:, :, num_prefix_tokens:, num_prefix_tokens:].double()  # (B, heads, P, P): patch queries and keys
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        out.append((w * dist).sum(dim=-1).mean(dim=-1))  # (B, heads): mean over queries
    return torch.stack(out, dim=1)  # (B, depth, heads)


def mean_attention_distance(attentions: Sequence[torch.Tensor], grid: tuple[int, int],
                            cell: tuple[int, int] | int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Mean attention distance in pixels (depth, heads) of captured attentions, averaged over the batch.

    ``cell``: pixels per patch side (the patch size for a ViT; backbone stride x patch for a hybrid).
    """
    return _per_image(attentions, grid, cell, num_prefix_tokens).mean(dim=0).float()


def attention_distance(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Mean attention distance (depth, heads) in pixels of ``model`` over a set of images (N, C, H, W)."""
    check_images(images)
    if batch_size < 1:
        raise ExplainError(f"batch_size must be positive, got {batch_size}.")
    lay = token_layout(model, images.shape[-2], images.shape[-1])
    total = None
    for start in range(0, images.shape[0], batch_size):
        cap = capture_attention(model, images[start:start + batch_size])
        per = _per_image(cap.attentions, lay.grid, lay.cell, lay.num_prefix_tokens).sum(dim=0)  # (depth, heads)
        total = per if total is None else total + per
    return (total / images.shape[0]).float()
