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
from vitviz.explain.capture import Layer, capture_attention
from vitviz.explain.layout import check_images

__all__ = ["attention_distance", "layer_distance", "mean_attention_distance", "patch_distances"]


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


def layer_distance(layer: Layer) -> torch.Tensor:
    """Mean attention distance in pixels per image and head (B, heads) of one captured layer, float64.

    Works for any token attention over a grid: queries and keys may lie on different grids (pooled
    keys), each cell's centre placed in pixels by its own cell size; prefix tokens are left out.
    """
    q, k = layer.queries, layer.keys
    if q.num_grid == 0 or k.num_grid == 0:
        raise ExplainError(f"layer {layer.name} has no grid queries or keys; attention distance needs both.")
    w = layer.weights[:, :, q.prefix:, k.prefix:].double()  # (B, heads, Pq, Pk)
    w = w / w.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    dist = _centre_distances(q.grid, q.cell, k.grid, k.cell).to(w.device)  # (Pq, Pk)
    return (w * dist).sum(dim=-1).mean(dim=-1)  # (B, heads)


def _centre_distances(qgrid: tuple[int, int], qcell: tuple[int, int], kgrid: tuple[int, int],
                      kcell: tuple[int, int]) -> torch.Tensor:
    """Pixel distance between every query cell centre and every key cell centre, (Pq, Pk)."""
    def centres(grid: tuple[int, int], cell: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1]) + 0.5) * cell[0]
        cols = (torch.arange(grid[1], dtype=torch.float64).repeat(grid[0]) + 0.5) * cell[1]
        return rows, cols

    qy, qx = centres(qgrid, qcell)
    ky, kx = centres(kgrid, kcell)
    return torch.sqrt((qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2)


def attention_distance(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Mean attention distance (layers, heads) in pixels of ``model`` over a set of images (N, C, H, W).

    Every token attention over a grid counts, on any adapted model; models whose layers have
    different numbers of heads get NaN where a layer has fewer heads than the widest, and layers
    whose queries are only a class token get NaN throughout.
    """
    check_images(images)
    if batch_size < 1:
        raise ExplainError(f"batch_size must be positive, got {batch_size}.")
    total = None
    for start in range(0, images.shape[0], batch_size):
        cap = capture_attention(model, images[start:start + batch_size])
        on_grid = {id(lay) for lay in cap.layers if lay.queries.num_grid and lay.keys.num_grid}
        if not on_grid:
            raise ExplainError(f"{type(model).__name__} has no attention between grid tokens (only from a class "
                               "token), so there is no attention distance to measure.")
        # A layer whose only query is a class token (CaiT's, XCiT's class attention) has no query position: NaN.
        per = [layer_distance(lay).sum(dim=0) if id(lay) in on_grid else
               torch.full((lay.weights.shape[1],), float("nan"), dtype=torch.float64) for lay in cap.layers]
        width = max(p.shape[0] for p in per)
        stacked = torch.stack([torch.cat([p, p.new_full((width - p.shape[0],), float("nan"))]) for p in per])
        total = stacked if total is None else total + stacked  # (layers, heads)
    return (total / images.shape[0]).float()
