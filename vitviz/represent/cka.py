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

__all__ = ["MinibatchCKA", "cka", "hsic_grid", "linear_kernel", "unbiased_hsic"]

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
    if min(a.shape[1], b.shape[1]) > a.shape[0]:
        # wide features (flattened maps): the same numbers from the (n, n) Gram matrices, which are smaller
        # than the (p, p) / (q, q) feature products: ||Yᵀ X||²_F = tr(K L) with K = X Xᵀ, L = Y Yᵀ
        k, l_ = a @ a.T, b @ b.T
        cross = (k * l_).sum()
        norm = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    else:
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
        cross, self_a, self_b = hsic_grid(torch.stack(ka), torch.stack(kb))
        self.cross += cross.cpu()
        self.self_a += self_a.cpu()
        self.self_b += self_b.cpu()
        self.batches += 1

    def sums(self) -> torch.Tensor:
        """The running sums as one flat float64 vector (cross, self_a, self_b, batches), for an all-reduce."""
        return torch.cat([self.cross.flatten(), self.self_a, self.self_b,
                          torch.tensor([float(self.batches)], dtype=torch.float64)])

    def load_sums(self, flat: torch.Tensor) -> None:
        """Replace the running sums by ``flat`` (as :meth:`sums` gives them, e.g. summed over processes)."""
        la, lb = self.self_a.numel(), self.self_b.numel()
        flat = flat.detach().cpu().double()
        if flat.numel() != la * lb + la + lb + 1:
            raise ConfigError(f"expected {la * lb + la + lb + 1} sums for {la} x {lb} layers, got {flat.numel()}.")
        self.cross = flat[: la * lb].reshape(la, lb).clone()
        self.self_a = flat[la * lb: la * lb + la].clone()
        self.self_b = flat[la * lb + la: -1].clone()
        self.batches = int(round(float(flat[-1])))

    def value(self) -> np.ndarray:
        """The CKA grid (layers_a, layers_b) from the batches seen so far."""
        if self.batches == 0:
            raise ConfigError("no batches yet: call update() with features first.")
        denom = torch.sqrt(self.self_a[:, None].clamp(min=0) * self.self_b[None, :].clamp(min=0))
        return (self.cross / denom.clamp(min=1e-300)).numpy()

    @staticmethod
    def _kernel(x: Array, name: str) -> torch.Tensor:
        return linear_kernel(x, name)


def linear_kernel(x: Array, name: str = "features") -> torch.Tensor:
    """The (n, n) linear kernel of (n, d) features, float64, on the features' device.

    The product runs in the features' own precision (float32 features: a float32 matmul, fast on any
    device) and is summed in float64 afterwards. The columns are centred first: the unbiased estimator
    is exactly invariant to shifting the features, and without the shift a float32 product of features
    with a large common mean (post-ReLU maps) would lose the small centred part to rounding.
    """
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        t = x.detach()
        if t.ndim != 2:
            raise ConfigError(f"{name} must be an (n, d) feature matrix, got shape {tuple(t.shape)}; flatten the "
                              "features of each example first.")
        t = t - t.mean(dim=0, keepdim=True)  # (n, d)
        k = (t @ t.T).double()  # (n, n)
        if not torch.isfinite(k).all():
            raise ConfigError(f"{name} holds non-finite values; CKA needs finite features.")
        return k
    t = _as_matrix(x, name)
    return t @ t.T  # (n, n)


def hsic_grid(ka: torch.Tensor, kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unbiased HSIC of every kernel in ``ka`` (La, n, n) with every one in ``kb`` (Lb, n, n), and of each
    with itself: ((La, Lb), (La,), (Lb,)), float64. The same numbers as :func:`unbiased_hsic` pair by pair,
    from one diagonal removal and a few contractions per batch."""
    n = ka.shape[-1]
    if n < 4:
        raise ConfigError(f"the unbiased HSIC estimator needs batches of at least 4 examples, got {n}.")
    eye = torch.eye(n, dtype=torch.bool, device=ka.device)
    ka = ka.double().masked_fill(eye, 0.0)  # K̃: the diagonal is left out
    kb = kb.to(ka.device).double().masked_fill(eye, 0.0)
    rows_a, rows_b = ka.sum(dim=-1), kb.sum(dim=-1)  # (La, n), (Lb, n): K̃ 1
    tot_a, tot_b = rows_a.sum(dim=-1), rows_b.sum(dim=-1)  # 1ᵀ K̃ 1

    def grid(x: torch.Tensor, y: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor, tx: torch.Tensor,
             ty: torch.Tensor) -> torch.Tensor:
        trace = torch.einsum("aij,bij->ab", x, y)  # tr(K̃ L̃), both symmetric
        sums = tx[:, None] * ty[None, :] / ((n - 1) * (n - 2))
        middle = 2.0 / (n - 2) * (rx @ ry.T)  # 1ᵀ K̃ L̃ 1
        return (trace + sums - middle) / (n * (n - 3))

    cross = grid(ka, kb, rows_a, rows_b, tot_a, tot_b)
    self_a = torch.stack([grid(k[None], k[None], r[None], r[None], t[None], t[None])[0, 0]
                          for k, r, t in zip(ka, rows_a, tot_a, strict=True)])
    self_b = torch.stack([grid(k[None], k[None], r[None], r[None], t[None], t[None])[0, 0]
                          for k, r, t in zip(kb, rows_b, tot_b, strict=True)])
    return cross, self_a, self_b
