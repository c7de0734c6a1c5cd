"""Embedding maps: one layer's pooled features over a dataset sample, in 2-d, coloured by class.

t-SNE comes from scikit-learn; UMAP when ``umap-learn`` is installed (an optional extra).
"""

from __future__ import annotations

import numpy as np
import torch

from vitviz.errors import ConfigError

__all__ = ["METHODS", "embed_2d", "umap_available"]

METHODS = ("tsne", "umap")


def umap_available() -> bool:
    """Whether ``umap-learn`` can be imported."""
    try:
        import umap  # noqa: F401
    except Exception:  # an absent or broken optional extra
        return False
    return True


def embed_2d(features: torch.Tensor | np.ndarray, method: str = "tsne", *, seed: int = 0,
             perplexity: float = 30.0) -> np.ndarray:
    """(N, D) features as (N, 2) coordinates; features are standardised first."""
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(
        features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 5:
        raise ConfigError(f"an embedding map needs at least 5 feature rows (N, D), got shape {x.shape}.")
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perp = min(perplexity, (x.shape[0] - 1) / 3)  # t-SNE needs perplexity < n
        return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)
    if method == "umap":
        if not umap_available():
            raise ConfigError("method='umap' needs umap-learn: pip install -e \".[umap]\" (or pip install umap-learn), "
                              "or use method='tsne'.")
        import umap

        return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, x.shape[0] - 1)).fit_transform(x)
    raise ConfigError(f"unknown embedding method {method!r}; use one of {', '.join(METHODS)}.")
