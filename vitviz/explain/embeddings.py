"""What a ViT's embeddings learned (the ViT paper's Fig. 7, left and centre).

* Patch-embedding filters: the (D, C, p, p) projection as RGB images, and the principal components
  of the D filters (PCA over vectors of size C*p*p).
* Position embeddings: cosine similarity of each patch's position embedding with every other's, as
  a grid of grids (gh, gw, gh, gw); also after resampling the embeddings to another grid, the way
  the model itself sees other input sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitviz.errors import ExplainError
from vitviz.explain.adapters import adapter_for

__all__ = [
    "FilterPCA", "filter_pca", "patch_embedding_filters", "patch_embedding_pca", "patch_embedding_weight",
    "pos_embed_similarity", "position_embeddings", "position_similarity",
]


@dataclass
class FilterPCA:
    """Principal components of the patch-embedding filters."""

    components: torch.Tensor  # (K, p, p, C), each min-max normalised to [0, 1] for display
    raw_components: torch.Tensor  # (K, C, p, p) unit-norm principal directions
    explained_variance_ratio: torch.Tensor  # (K,) fraction of the filters' variance per component


def patch_embedding_weight(model: nn.Module) -> torch.Tensor:
    """Patch projection filters (D, C, p, p) of a ViT (ours or timm); ExplainError for others."""
    adapter = adapter_for(model)
    w = adapter.patch_embedding_weight()
    if w is None:
        family = adapter.family
        raise ExplainError(
            f"a {family} model ({type(model).__name__}) has no pixel-space patch filters "
            + ("(its tokens come from a CNN feature map, not from pixels)." if family == "hybrid" else
               "(its stem is not a linear projection of non-overlapping patches).")
        )
    return w.detach().float().cpu()  # (D, C, p, p)


def _display(x: torch.Tensor) -> torch.Tensor:
    """(K, C, p, p) -> (K, p, p, C), each item min-max normalised to [0, 1]."""
    flat = x.reshape(x.shape[0], -1)  # (K, C*p*p)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    flat = (flat - lo) / (hi - lo).clamp(min=1e-12)
    return flat.reshape(x.shape).permute(0, 2, 3, 1).contiguous()


def patch_embedding_filters(model: nn.Module) -> torch.Tensor:
    """The D filters as images (D, p, p, C), each normalised to [0, 1] for display."""
    return _display(patch_embedding_weight(model))


def filter_pca(weight: torch.Tensor, n_components: int | None = None) -> FilterPCA:
    """PCA over the D filters of a (D, C, p, p) weight: the top ``n_components`` directions.

    ``n_components=None`` takes 28 (the paper's figure), or fewer when there are fewer directions.

    Filters are centred (the mean filter removed) before the SVD, as in any PCA; components have an
    arbitrary sign, which display normalisation makes harmless.
    """
    if weight.ndim != 4:
        raise ExplainError(f"expected patch filters (D, C, p, p), got shape {tuple(weight.shape)}.")
    d, c, ph, pw = weight.shape
    limit = min(d, c * ph * pw)
    if n_components is None:
        n_components = min(28, limit)
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not 1 <= n_components <= limit:
        raise ExplainError(f"n_components must be in 1..{limit} for {d} filters of size {c}x{ph}x{pw}, "
                           f"got {n_components!r}.")
    flat = weight.detach().double().reshape(d, -1)  # (D, C*p*p)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)  # vh: (min(D, Cpp), C*p*p)
    var = s**2
    ratio = (var / var.sum().clamp(min=1e-30))[:n_components]
    comps = vh[:n_components].reshape(n_components, c, ph, pw).float()  # (K, C, p, p)
    return FilterPCA(components=_display(comps), raw_components=comps, explained_variance_ratio=ratio.float())


def patch_embedding_pca(model: nn.Module, n_components: int | None = None) -> FilterPCA:
    """:func:`filter_pca` of a ViT's patch-embedding filters (the paper's Fig. 7, left)."""
    return filter_pca(patch_embedding_weight(model), n_components)


def position_embeddings(model: nn.Module, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Patch position embeddings as a grid (gh, gw, D), resampled to ``grid`` when given."""
    from vitviz.models.layers import resample_pos_embed

    found = adapter_for(model).position_embedding()
    if found is None:
        raise ExplainError(f"{type(model).__name__} has no learned absolute position embeddings (it is a CNN, or "
                           "it encodes positions relatively or by rotation); pick a ViT or hybrid that learns them.")
    pos, base, prefix = found
    pos = pos.detach().float().cpu()  # (1, prefix + N, D)
    if pos.ndim == 2:
        pos = pos[None]
    base = tuple(int(g) for g in base)
    if pos.shape[1] - prefix != base[0] * base[1]:
        raise ExplainError(f"position embedding of {pos.shape[1]} entries does not fit a {base} grid.")
    if grid is not None:
        grid = _check_grid(grid)
        pos = resample_pos_embed(pos, base, grid, prefix)  # (1, prefix + gh*gw, D)
        base = grid
    return pos[0, prefix:].reshape(base[0], base[1], -1)  # (gh, gw, D)


def pos_embed_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every grid position with every other: (gh, gw, D) -> (gh, gw, gh, gw)."""
    gh, gw, d = embeddings.shape
    flat = F.normalize(embeddings.reshape(gh * gw, d).double(), dim=-1)  # (P, D)
    sim = (flat @ flat.T).clamp(-1.0, 1.0)  # (P, P)
    return sim.float().reshape(gh, gw, gh, gw)


def position_similarity(model: nn.Module, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Position-embedding similarity (gh, gw, gh, gw) of a ViT or hybrid; ``grid`` resamples first.

    Entry [i, j, k, l] is the cosine similarity of patch (i, j)'s embedding with patch (k, l)'s;
    [i, j] is the small map the paper's Fig. 7 (centre) draws at position (i, j).
    """
    return pos_embed_similarity(position_embeddings(model, grid))


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError) as err:
        raise ExplainError(f"grid must be (rows, cols), got {grid!r}.") from err
    if gh < 1 or gw < 1:
        raise ExplainError(f"grid must have positive rows and cols, got {grid!r}.")
    return gh, gw
