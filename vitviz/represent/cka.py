"""Linear centred kernel alignment, whole-sample and as an unbiased minibatch estimate.

Linear CKA of X (n, p) and Y (n, q), columns centred, is ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)
(Kornblith et al. 2019): 1 for the same features, invariant to orthogonal transforms and isotropic
scaling of either side, not to other invertible linear maps.

The minibatch estimate (Nguyen, Raghu & Kornblith 2021) averages the unbiased HSIC estimator of Song
et al. (2012) over batches, for each pair and for each side with itself, and forms CKA from the
averages. Memory is one batch of features, whatever the dataset's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vitviz.errors import ConfigError

__all__ = ["MinibatchCKA", "cka", "unbiased_hsic"]

Array = np.ndarray | torch.Tensor


def _as_matrix(x: Array, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    if t.ndim != 2:
        raise ConfigError(f"{name} must be an (n, d) feature matrix, got shape {tuple(t.shape)}; flatten the "
                          "features of each example first.")
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name} holds non-finite values; CKA needs finite features.")
    return t.double()


def cka(x: Array, y: Array) -> float:
    """Linear CKA of features ``x`` (n, p) and ``y`` (n, q) of the same n examples, in [0, 1]."""
    a, b = _as_matrix(x, "x"), _as_matrix(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ConfigError(f"x and y must describe the same examples: {a.shape[0]} rows vs {b.shape[0]}.")
    if a.shape[0] < 2:
        raise ConfigError("CKA needs at least 2 examples.")
    a = a - a.mean(dim=0, keepdim=True)  # centring the columns centres the linear kernel
    b = b - b.mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(b.T @ a) ** 2
    norm = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    if float(norm) == 0.0:
        raise ConfigError("one of the feature matrices is constant over the examples; CKA is undefined.")
    return float(cross / norm)


def unbiased_hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC estimate of two (n, n) kernel matrices (n >= 4), float64 scalar."""
    n = k.shape[0]
    if n < 4:
        raise ConfigError(f"the unbiased HSIC estimator needs batches of at least 4 examples, got {n}.")
    k = k.double().clone().fill_diagonal_(0.0)  # K̃: the diagonal is left out
    l_ = l_.double().clone().fill_diagonal_(0.0)
    ones = torch.ones(n, dtype=torch.float64, device=k.device)
    trace = (k * l_.T).sum()  # tr(K̃ L̃)
    sums = (ones @ k @ ones) * (ones @ l_ @ ones) / ((n - 1) * (n - 2))
    middle = 2.0 / (n - 2) * (ones @ k @ (l_ @ ones))
    return (trace + sums - middle) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates the linear-CKA grid of every layer of model A against every layer of model B.

    Call :meth:`update` with each batch's features, [(n, p_i)] for A's layers and [(n, q_j)] for B's
    (the same n examples, n >= 4); :meth:`value` gives the (layers_a, layers_b) grid. Only the running
    HSIC sums are kept: memory is independent of the number of batches.
    """

    def __init__(self, layers_a: int, layers_b: int) -> None:
        if layers_a < 1 or layers_b < 1:
            raise ConfigError(f"MinibatchCKA needs at least one layer on each side, got {layers_a} x {layers_b}.")
        self.cross = torch.zeros(layers_a, layers_b, dtype=torch.float64)
        self.self_a = torch.zeros(layers_a, dtype=torch.float64)
        self.self_b = torch.zeros(layers_b, dtype=torch.float64)
        self.batches = 0

    def update(self, feats_a: Sequence[Array], feats_b: Sequence[Array]) -> None:
        """Add one batch: each layer's features of the same examples, flattened to (n, d)."""
        if len(feats_a) != self.self_a.numel() or len(feats_b) != self.self_b.numel():
            raise ConfigError(f"expected {self.self_a.numel()} and {self.self_b.numel()} layers of features, "
                              f"got {len(feats_a)} and {len(feats_b)}.")
        ka = [self._kernel(f, f"layer {i} of A") for i, f in enumerate(feats_a)]  # [(n, n)]
        kb = [self._kernel(f, f"layer {j} of B") for j, f in enumerate(feats_b)]
        if len({k.shape[0] for k in ka + kb}) != 1:
            raise ConfigError("every layer's features in one update must describe the same examples.")
        for i, k in enumerate(ka):
            self.self_a[i] += unbiased_hsic(k, k)
            for j, l_ in enumerate(kb):
                self.cross[i, j] += unbiased_hsic(k, l_)
        for j, l_ in enumerate(kb):
            self.self_b[j] += unbiased_hsic(l_, l_)
        self.batches += 1

    def value(self) -> np.ndarray:
        """The CKA grid (layers_a, layers_b) from the batches seen so far."""
        if self.batches == 0:
            raise ConfigError("no batches yet: call update() with features first.")
        denom = torch.sqrt(self.self_a[:, None].clamp(min=0) * self.self_b[None, :].clamp(min=0))
        return (self.cross / denom.clamp(min=1e-300)).numpy()

    @staticmethod
    def _kernel(x: Array, name: str) -> torch.Tensor:
        t = _as_matrix(x, name)
        return t @ t.T  # (n, n) linear kernel; the estimator centres it implicitly
