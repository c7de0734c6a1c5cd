"""What the last layer's features say on their own, for any model (with or without a classifier head).

* :func:`patch_similarity`: cosine similarity of every cell's features to one query cell
  ("where else is this?").
* :func:`feature_pca`: the first three principal components of the patch features as RGB, the
  picture DINO made well known: parts that the model represents alike get alike colours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import adapter_for
from vitviz.explain.layout import check_images

__all__ = ["feature_pca", "grid_features", "patch_similarity"]


def grid_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Last-layer features on the grid (B, h, w, D), pixels per cell, and the logits of the same pass."""
    check_images(x)
    return adapter_for(model).grid_features(x)


def _query_cell(query: Any, grid: tuple[int, int]) -> tuple[int, int]:
    gh, gw = grid
    if query is None:
        return gh // 2, gw // 2
    if isinstance(query, bool):
        raise ExplainError(f"query must be (row, col) or a flat cell index, got {query!r}.")
    if isinstance(query, int):
        if not 0 <= query < gh * gw:
            raise ExplainError(f"query cell index {query} is out of range for a {gh}x{gw} grid (0..{gh * gw - 1}).")
        return divmod(query, gw)
    try:
        row, col = (int(v) for v in query)
    except (TypeError, ValueError) as err:
        raise ExplainError(f"query must be (row, col) or a flat cell index, got {query!r}.") from err
    if not (0 <= row < gh and 0 <= col < gw):
        raise ExplainError(f"query cell ({row}, {col}) is outside the {gh}x{gw} feature grid.")
    return row, col


def patch_similarity(model: nn.Module, x: torch.Tensor,
                     query: Any = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Cosine similarity (B, h, w) of each cell's last-layer features to the ``query`` cell's, in [-1, 1].

    ``query``: (row, col) or a flat index on the feature grid; None takes the centre cell.
    Returns (similarity, logits, pixels per cell).
    """
    feats, cell, logits = grid_features(model, x)  # (B, h, w, D)
    row, col = _query_cell(query, feats.shape[1:3])
    unit = F.normalize(feats.float(), dim=-1)  # (B, h, w, D)
    sim = (unit * unit[:, row, col][:, None, None, :]).sum(dim=-1)  # (B, h, w)
    return sim, logits, cell


def feature_pca(model: nn.Module, x: torch.Tensor, n_components: int = 3) -> tuple[torch.Tensor, tuple[int, int]]:
    """The top principal components of the batch's last-layer cell features, (B, h, w, n), each scaled to [0, 1].

    Components are fitted over every cell of every image in ``x`` (so images in one batch share
    colours), with the features centred first; each component's sign is fixed so that its largest
    loading is positive, which makes the colours reproducible. Returns (components, pixels per cell).
    """
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ExplainError(f"n_components must be a positive integer, got {n_components!r}.")
    feats, cell, _ = grid_features(model, x)  # (B, h, w, D)
    b, h, w, d = feats.shape
    if n_components > min(b * h * w, d):
        raise ExplainError(f"n_components {n_components} exceeds the {b * h * w} cells x {d} features available.")
    flat = feats.reshape(-1, d).double()  # (B*h*w, D)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)  # vh: (min, D)
    comps = vh[:n_components]  # (n, D)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))  # (n, 1)
    proj = flat @ (comps * signs).T  # (B*h*w, n)
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    proj = (proj - lo) / (hi - lo).clamp(min=1e-12)
    return proj.float().reshape(b, h, w, n_components), cell
